"""Loading the native extension fasttrain._C without ever breaking ``import fasttrain``."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load():
    """Return (module, None) when fasttrain._C imports, else (None, reason)."""
    import torch  # noqa: F401  (loads libtorch, which the extension links against)

    try:
        module = importlib.import_module("fasttrain._C")
    except Exception as e:  # a missing build, an ABI mismatch with torch, an undefined symbol...
        return (
            None,
            f"fasttrain._C failed to import ({type(e).__name__}: {e}); "
            "reinstall with `pip install --no-build-isolation .`",
        )
    return module, None


def available() -> bool:
    return load()[0] is not None


def why_unavailable() -> str | None:
    return load()[1]


def built_with_cuda() -> bool:
    module = load()[0]
    return module is not None and module.built_with_cuda()
