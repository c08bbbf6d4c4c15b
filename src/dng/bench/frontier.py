"""The frontier a class-removal run draws by default: NP from barely acting to removing everything, and DNG's lam0
from the exact score (1) to well past NP's removal. Its own module so that the CLI's help reads it without
importing the bench."""

NP_SCALES = (0.1, 0.2, 0.35, 0.5, 1.0)
DNG_LAM0S = (1.0, 2.0, 4.0, 8.0)


def as_text(scales) -> str:
    """The scales as the command line takes them: 0.1,0.2,0.35,0.5,1."""
    return ",".join(f"{s:g}" for s in scales)
