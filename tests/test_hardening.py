"""Issue 29, the CLI's part: degenerate images flagged by every command that must finish, sample files that know
what they are, numbers checked before any work, the DNG values in force reported and checked, a CLI that starts fast
and speaks plainly."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_building_the_parser_loads_no_heavy_module():
    # `dng --help` and a bad option took 3-9 s: `dng bench prompted`'s register imported the bench (torch, diffusers).
    code = ("import sys\nfrom dng.cli import build_parser\nbuild_parser()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'diffusers', 'transformers', "
            "'scipy', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_known_harmless_third_party_notices_are_silenced_by_the_command_only(caplog):
    import logging

    from dng import cli

    notices = {"transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); "
                                                  "falling back to `CLIPImageProcessorPil`",
               "diffusers.models.modeling_utils": "Cannot initialize model with low cpu memory usage because "
                                                  "`accelerate` was not found in the environment.",
               "diffusers.pipelines.pipeline_utils": "Pipelines loaded with `dtype=torch.float16` cannot run with "
                                                     "`cpu` device."}
    with pytest.raises(SystemExit):
        cli.main(["sample", "--no-such-option"])
    with caplog.at_level(logging.WARNING):
        for name, text in notices.items():
            logging.getLogger(name).warning(text)
            logging.getLogger(name).warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"] * 3
