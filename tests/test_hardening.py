"""Issue 29, the CLI's part: degenerate images flagged by every command that must finish, sample files that know
what they are, numbers checked before any work, the DNG values in force reported and checked, a CLI that starts fast
and speaks plainly."""

import subprocess
import sys

import pytest

from dng import cli, commands

pytestmark = pytest.mark.usefixtures("one_thread")

# Every command that samples the generator or trains, with the options it needs to start.
SAMPLING = [["sample", "--out", "x"], ["demo", "--out", "x"], ["calibrate"], ["bench", "class-removal", "--out", "x"],
            ["bench", "prompted", "--out", "x"]]
TRAINING = [["train", "generator", "--out", "x", "--steps", "1"], ["train", "classifier", "--out", "x"]]


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """Loading a model (or training one) fails the test: every refusal here comes before any."""
    from dng.bench import class_removal, prompted
    from dng.vision import models, train

    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded")

    for module in (models, class_removal, prompted):
        monkeypatch.setattr(module, "load_generator", loaded)
        monkeypatch.setattr(module, "load_classifier", loaded)
    monkeypatch.setattr(train, "train_generator", loaded)
    monkeypatch.setattr(train, "train_classifier", loaded)
    monkeypatch.chdir(tmp_path)


def _refused(argv, message, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


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


@pytest.mark.parametrize("argv", SAMPLING + TRAINING)
@pytest.mark.parametrize("seed", ["-1", str(10**23), str(2**63)])
def test_seeds_outside_0_to_2_63_are_refused_before_any_model_loads(no_models, capsys, argv, seed):
    # demo and the benches failed after sampling with numpy's ValueError; 10**23 overflowed in torch.
    _refused([*argv, "--seed", seed], "--seed must be a whole number from 0 to 2**63 - 1", capsys)


def test_the_largest_seed_is_taken(no_models):
    assert commands.check_seed(2**63 - 1) == 2**63 - 1 and commands.check_seed(None) is None


@pytest.mark.parametrize("argv", SAMPLING)
def test_counts_beyond_memory_are_refused_with_the_estimate(no_models, capsys, argv):
    # sample was killed after 69 s, demo raised an allocation traceback, the bench a MemoryError after 34 s.
    err = _refused([*argv, "--num-images", "100000000000"], "--num-images 100000000000 needs about", capsys)
    assert "GB of memory" in err and "kB per image kept" in err and "available: lower --num-images" in err


@pytest.mark.parametrize("argv, option", [(argv, "--num-images") for argv in SAMPLING]
                         + [(argv, "--num-samples") for argv in SAMPLING[2:]])
def test_counts_must_be_whole_numbers(capsys, argv, option):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, option, "1e11"])
    assert done.value.code == 2 and "invalid int value: '1e11'" in capsys.readouterr().err


def test_the_memory_estimate_counts_precision_recall_and_the_batch(monkeypatch):
    from dng.errors import ConfigError

    monkeypatch.setattr(commands, "memory_available", lambda: 16e9)
    # 30 000 images fit as images, not as the N x N distances of precision/recall.
    assert commands.check_memory("--num-images", 30_000, 10e3) < 1e9
    with pytest.raises(ConfigError, match="32 bytes per pair"):
        commands.check_memory("--num-images", 30_000, 10e3, per_pair=commands.PER_PAIR_PRECISION_RECALL)
    # A batch of 10 000 images in the UNet is the problem, not the images: both options are named.
    with pytest.raises(ConfigError, match="lower --batch-size or --num-images"):
        commands.check_memory("--num-images", 10_000, 10e3, batch=10_000, batch_option="--batch-size")
