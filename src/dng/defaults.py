"""What a run draws when it is not told, for the defaults that a library function and the `dng` command share: one
source for both and for the command's help, in a module that imports nothing heavy so that the help reads it
without importing torch. (DNG's own settings live in `dng.config.DNGConfig`.)"""

# How the Fashion-MNIST commands and benches sample the shipped generator when not told (and images per cell of a
# bench).
GENERATOR_SAMPLER = "euler-a"
GENERATOR_STEPS = 25
GENERATOR_BATCH = 128  # images per sampler run
BENCH_IMAGES = 500

# Class-removal bench: NP from barely acting to removing everything, and DNG's lam0 from the exact score (1) to well
# past NP's removal (SLD runs its four presets).
NP_SCALES = (0.1, 0.2, 0.35, 0.5, 1.0)
DNG_LAM0S = (1.0, 2.0, 4.0, 8.0)
# CFG's scale w on a class of the shipped generator (`dng sample --class`, the prompted bench), and the prompted
# bench's NP scales as multiples of w - 1 (diffusers' negative prompt): one weaker, one equal, one stronger.
CFG_SCALE = 2.0
NP_FACTORS = (0.5, 1.0, 2.0)

# Training the shipped models (`dng.vision.train`).
TRAIN_GENERATOR = {"batch_size": 128, "lr": 5e-4, "seed": 0, "ema_decay": 0.999, "label_dropout": 0.15,
                   "warmup_steps": 100}
TRAIN_CLASSIFIER = {"batch_size": 128, "lr": 2e-3, "seed": 0}
CLASSIFIER_EPOCHS = 8

# Steps of a diffusers pipeline's chains in `dng sd` and its calibration from its own branches
# (`dng.pipelines.calibrate_pipeline`), with that calibration's chains and images per pipeline call.
PIPELINE_STEPS = 30
PIPELINE_CALIBRATION = {"num_images": 200, "steps": PIPELINE_STEPS, "batch_size": 4}
# Safe Latent Diffusion's preset (`dng.guidance.SLD_PRESETS`, diffusers' SafetyConfig) when none is named.
SLD_PRESET = "medium"
# The verdict's noisy copies per image (`dng.verdict`).
VERDICT_DRAWS = 32


def as_text(scales) -> str:
    """The scales as the command line takes them: 0.1,0.2,0.35,0.5,1."""
    return ",".join(f"{s:g}" for s in scales)
