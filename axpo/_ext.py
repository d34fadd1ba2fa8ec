"""Loads the compiled extension axpo._C once, remembering why it is missing if it is."""
from __future__ import annotations

_loaded: tuple | None = None


def load():
    """Returns (module or None, reason or None)."""
    global _loaded
    if _loaded is None:
        try:
            import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

            from axpo import _C
            _loaded = (_C, None)
        except ImportError as e:  # not built, or built against another torch
            _loaded = (None, f"axpo._C did not import ({e}); build it with "
                             "`pip install -e .` after installing torch")
    return _loaded
