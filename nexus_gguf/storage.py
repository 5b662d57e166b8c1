"""Where .nxkv files live: local paths, or any fsspec URL (memory://, s3://, gs://, http(s)://,
...; pip install 'nexus-gguf[remote]' for fsspec itself, plus its backend for the scheme).
Remote files are read with ranged reads (the header first, then the sections needed) and
written whole: to a temporary name beside the target, then moved onto it."""

from __future__ import annotations

import os
import uuid
from typing import Iterable

from .errors import NxkvError


def is_url(path) -> bool:
    """An fsspec URL (scheme://...); plain paths and Windows drive letters are not."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise NxkvError(f"{url}: remote paths need fsspec: pip install 'nexus-gguf[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise NxkvError(f"{url}: {e}") from None


def open_read(url: str):
    """(a seekable binary file, its size) for a remote .nxkv file, reading byte ranges on demand."""
    fs, path = _fs(url)
    try:
        size = int(fs.size(path))
        # no read-ahead cache: each read asks for exactly the bytes it needs
        return fs.open(path, "rb", cache_type="none"), size
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such remote file", url) from None


def write_atomic_url(url: str, buffers: Iterable) -> int:
    """Write a remote file so that readers see the old one or the whole new one: a temporary
    name beside it, then a move (object stores make a written object visible whole)."""
    fs, path = _fs(url)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    n = 0
    try:
        with fs.open(tmp, "wb") as f:
            for b in buffers:
                f.write(b)
                n += len(b)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except (OSError, NotImplementedError):
            pass
        raise
    return n


def write_atomic(path, buffers: Iterable) -> int:
    """format.write_atomic for local paths, write_atomic_url for URLs."""
    from .format import write_atomic as write_local

    path = os.fspath(path)
    return write_atomic_url(path, buffers) if is_url(path) else write_local(path, buffers)
