"""nexus-gguf: compressed, checksummed llama.cpp prompt states (.nxkv) for llama-cpp-python."""

__version__ = "0.1.0"

from .api import LoadReport, SaveReport, load_state, read_info, save_state  # noqa: E402
from .backends import backend_features  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumError,
    ConfigError,
    FormatError,
    ModelMismatchError,
    NativeLibraryError,
    NxkvError,
    RestoreError,
    StateLayoutError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .pipeline import PRESETS  # noqa: E402

__all__ = [
    "NxkvDiskCache",
    "backend",
    "backend_features",
    "save_state",
    "load_state",
    "read_info",
    "SaveReport",
    "LoadReport",
    "PRESETS",
    "NxkvError",
    "FormatError",
    "ChecksumError",
    "UnsupportedVersionError",
    "ModelMismatchError",
    "StateLayoutError",
    "UnsupportedModelError",
    "RestoreError",
    "ConfigError",
    "NativeLibraryError",
]


def __getattr__(name: str):
    # `nexus_gguf.backend`: resolved on first use, so importing the package never loads a backend
    if name == "backend":
        from .backends import backend_name

        return backend_name()
    if name == "NxkvDiskCache":  # imports llama-cpp-python: only when asked for
        from .prompt_cache import NxkvDiskCache

        return NxkvDiskCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
