"""README's Python examples run as written (those that need Stable Diffusion weights are left out)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", [b for b in BLOCKS if "from_pretrained" not in b], ids=lambda b: b.split("\n")[0])
def test_readme_example_runs(code, one_thread):
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.samples.shape == (8, 1, 28, 28) and out.trace.p.shape == (25, 8, 1)


def test_readme_has_a_runnable_example():
    assert any("from_pretrained" not in b for b in BLOCKS)


def test_readme_sample_and_demo_run_the_same_dng(tmp_path, capsys, monkeypatch):
    """The README's rule, `dng sample --method dng --remove Bag` and `dng demo --remove Bag` use one DNG config."""
    from dng import cli
    from dng.config import DNGConfig
    from dng.vision import generate

    code = next(b for b in BLOCKS if "from_pretrained" not in b)
    namespace: dict = {}
    exec(compile(code.split("out = sample(")[0], str(README), "exec"), namespace)
    readme = namespace["rule"].config

    seen = {}
    real = generate.make_rule

    def record(method, *, dng=None, **kwargs):
        if method != "dng":
            return real(method, **kwargs)
        seen[command] = dng
        raise SystemExit(0)  # the settings are all this test needs: stop before sampling

    monkeypatch.setattr(generate, "make_rule", record)
    for command, out, extra in (("sample", tmp_path / "g", ["--method", "dng"]), ("demo", tmp_path / "demo", []),
                                ("demo-default", tmp_path / "d2", ["--dng-preset", "default"])):
        with pytest.raises(SystemExit):
            cli.main([command.split("-")[0], *extra, "--remove", "Bag", "--out", str(out)])
    # The demo runs the strict preset: the same calibration at a larger lam0.
    assert seen["sample"] == seen["demo-default"] == readme and seen["demo"] == readme.replace(lam0=4.0)
    # The generator's calibration is in force, not the library default.
    assert readme != DNGConfig() and readme.temperature < 1 and readme.offset > 0
