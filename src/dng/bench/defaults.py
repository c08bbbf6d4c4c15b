"""What the Fashion-MNIST benches draw when a run does not say: one source for the benches and the CLI's help, in a
module of its own so that the help reads it without importing a bench."""

# Class removal: NP from barely acting to removing everything, and DNG's lam0 from the exact score (1) to well past
# NP's removal (SLD runs its four presets).
NP_SCALES = (0.1, 0.2, 0.35, 0.5, 1.0)
DNG_LAM0S = (1.0, 2.0, 4.0, 8.0)
# Prompted: CFG's scale w on the positive class, and NP's scales as multiples of w - 1 (diffusers' negative prompt):
# one weaker, one equal, one stronger.
CFG_SCALE = 2.0
NP_FACTORS = (0.5, 1.0, 2.0)


def as_text(scales) -> str:
    """The scales as the command line takes them: 0.1,0.2,0.35,0.5,1."""
    return ",".join(f"{s:g}" for s in scales)
