"""The exceptions nexus-gguf raises. Every one derives from NxkvError, so callers can catch one
type; the subclasses say what went wrong so that callers (and the CLI) can say it clearly."""


class NxkvError(Exception):
    """Base class of every error nexus-gguf raises on purpose."""


class FormatError(NxkvError):
    """The file is not a well-formed .nxkv file (wrong magic, truncated, bad header, holes)."""


class ChecksumError(FormatError):
    """A checksum did not match: the file was damaged after it was written."""


class UnsupportedVersionError(FormatError):
    """The file was written by a newer format version than this reader understands."""


class ModelMismatchError(NxkvError):
    """The state was saved from another model than the one it is being loaded into."""


class StateLayoutError(NxkvError):
    """A llama.cpp state blob does not have the layout this parser expects."""


class UnsupportedModelError(NxkvError):
    """The model's memory (recurrent, hybrid, ...) is not something nexus-gguf can store."""


class RestoreError(NxkvError):
    """llama.cpp refused the state, or the target context cannot hold it. The Llama was left as
    it was before the call."""


class ConfigError(NxkvError, ValueError):
    """A preset or stage option is unknown or out of range."""


class NativeLibraryError(NxkvError, RuntimeError):
    """The native library was asked for but could not be loaded."""
