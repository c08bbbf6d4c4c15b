"""What the installed package promises: its public API, type information, extras, and a core without matplotlib."""

import ast
import importlib
import importlib.metadata
import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

import dng
from dng import cli

CORE = ["dng.guidance", "dng.posterior", "dng.kernels", "dng.schedulers", "dng.sampler", "dng.calibration",
        "dng.gmm", "dng.metrics", "dng.pipelines", "dng.vision.generate", "dng.cli"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_public_api_names_resolve_to_their_modules_objects():
    assert dng.__all__ and set(dng.__all__) <= set(dir(dng))
    for name in dng.__all__:
        assert getattr(dng, name) is getattr(importlib.import_module(dng._MODULE_OF[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dng.nothing  # noqa: B018


def test_import_dng_loads_no_torch():
    # The dng command checks its options before the slow imports; importing the package must not undo that.
    result = _python("import sys, dng, dng.errors; print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


def test_version_and_type_information_are_installed():
    assert importlib.metadata.version("dng") == dng.__version__
    assert importlib.resources.files("dng").joinpath("py.typed").is_file()


def test_dev_extra_includes_every_other_extra():
    requires = importlib.metadata.requires("dng")
    extras = set(importlib.metadata.metadata("dng").get_all("Provides-Extra")) - {"dev"}
    dev = [r for r in requires if r.endswith('extra == "dev"')]
    assert f"dng[{','.join(sorted(extras))}]" in [r.split(";")[0].strip() for r in dev]
    assert not [r for r in requires if r.startswith("pytest-benchmark")]


def test_core_runs_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            + "".join(f"import {m}\n" for m in CORE)
            + "from dng.cli import build_parser; build_parser()")
    result = _python(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["demo"], ["sd", "--model", "m", "--prompt", "a", "--negative", "b", "--out", "o"],
                                  ["bench", "gmm", "--plot"]])
def test_figure_commands_name_the_plots_extra_without_matplotlib(argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(argv) == 2
    assert f"dng {argv[0]} writes figures with matplotlib, which is not installed: pip install 'dng[plots]'" \
        in capsys.readouterr().err


def _dng_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The dng modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dng"):
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return (found & modules) - {module}


def test_no_import_circle_in_the_package():
    """Counting imports inside functions too: a circle there is hidden, not gone."""
    src = Path(__file__).resolve().parents[1] / "src" / "dng"
    paths = {".".join(("dng", *p.relative_to(src).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in src.rglob("*.py")}
    graph = {m: _dng_imports(p, m, set(paths)) for m, p in paths.items()}
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import circle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done:
            return
        active.append(module)
        for other in sorted(graph[module]):
            visit(other)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
