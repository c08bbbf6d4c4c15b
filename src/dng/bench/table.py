"""What the benches share about their results table: the one label of a setting."""

from __future__ import annotations


def setting_label(method: str, params: dict, scale_format: str = "") -> str:
    """Short name of a setting in every bench: 'none', 'np 2.0' (with `scale_format` 'g': 'np 2'), 'sld medium',
    'dng default', 'dng default scale=3', 'dng-branches default'. Labels name stored cells: a change orphans them."""
    if method in ("dng", "dng-branches"):
        user = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
                       for k, v in params.get("set", {}).items())
        return f"{method} {params.get('preset', 'default')}{user}"
    if method == "np":
        return f"np {params['scale']:{scale_format}}"
    if method == "sld":
        return f"sld {params['preset']}"
    return method
