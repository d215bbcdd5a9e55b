"""Loads the compiled operator library (``moeforge/_C.so``) into ``torch.ops.moeforge``.

The library has no Python C API (one binary serves every Python version); it registers its ops
with ``TORCH_LIBRARY`` when :func:`torch.ops.load_library` opens it.
"""

from __future__ import annotations

import importlib.util

import torch

_loaded = False


def load() -> None:
    """Load ``_C.so`` once; raise a helpful ImportError if the package was not built."""
    global _loaded
    if _loaded:
        return
    spec = importlib.util.find_spec("moeforge._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            "moeforge: the compiled library moeforge/_C.so was not found. Build and install the "
            "package with `pip install --no-build-isolation .` from the repository root."
        )
    torch.ops.load_library(spec.origin)
    _loaded = True


def built_with_cuda() -> bool:
    """True when this build compiled the CUDA kernels (whether or not a GPU is present)."""
    load()
    return bool(torch.ops.moeforge.built_with_cuda())
