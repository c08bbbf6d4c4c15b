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
