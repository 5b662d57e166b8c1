"""Kernel backends, chosen by an explicit policy (python-zstandard's habit).

NEXUS_GGUF_BACKEND = auto (default) | native | numba | reference
  auto: the native library if it loads, else Numba, with a warning that says why.
  native / numba / reference: that one, or a clear error.
`backend()` returns the kernel module in use, `backend_name()` its name, `backend_features()`
what each candidate reported."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from ..errors import ConfigError, NativeLibraryError

_MODULES = {"native": "native", "numba": "numba_cpu", "reference": "reference"}
_resolved: dict[str, tuple[str, ModuleType]] = {}


def _load(name: str) -> ModuleType:
    mod = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    if name == "native":
        mod.load()
    return mod


def _resolve(policy: str) -> tuple[str, ModuleType]:
    if policy not in _resolved:
        if policy == "auto":
            try:
                _resolved[policy] = ("native", _load("native"))
            except NativeLibraryError as e:
                warnings.warn(f"nexus-gguf: using the Numba backend: {e}", RuntimeWarning, stacklevel=3)
                _resolved[policy] = ("numba", _load("numba"))
        elif policy in _MODULES:
            _resolved[policy] = (policy, _load(policy))
        else:
            raise ConfigError(f"NEXUS_GGUF_BACKEND={policy!r}; choose one of auto, {', '.join(_MODULES)}")
    return _resolved[policy]


def _policy(name: str | None) -> str:
    return (name or os.environ.get("NEXUS_GGUF_BACKEND") or "auto").lower()


def backend(name: str | None = None) -> ModuleType:
    """The kernel module for `name`, or for the NEXUS_GGUF_BACKEND policy when name is None."""
    return _resolve(_policy(name))[1]


def backend_name(name: str | None = None) -> str:
    return _resolve(_policy(name))[0]


def backend_features() -> dict[str, str]:
    """For each backend: 'available' or why it is not."""
    out = {}
    for n in _MODULES:
        try:
            _load(n)
            out[n] = "available"
        except (NativeLibraryError, ImportError) as e:
            out[n] = f"unavailable: {e}"
    return out


def kernel(op: str):
    """The implementation of kernel `op` in the chosen backend. Kernels the native library
    does not have yet (E8, rANS: README, "What does not work yet") come from Numba; that is a
    coverage gap of the native library, not a fallback hiding a failure."""
    mod = backend()
    impl = getattr(mod, op, None)
    if impl is None and backend_name() == "native":
        impl = getattr(_resolve("numba")[1], op, None)
    if impl is None:
        raise ConfigError(f"no backend provides kernel {op!r}")
    return impl

