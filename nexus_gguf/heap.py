"""Memory given back to the operating system during a save: the heap's freed pages, and the
pages of a state's rows once they are encoded.

glibc keeps what a thread frees in that thread's arena for its next allocations; other threads
allocate from arenas of their own. A save frees the query capture's side context (its cache and
buffers: ~70-77 MB for a 7680-token SmolLM2 state) on the calling thread, then encodes the layers on
worker threads: without this, the first save in a process held both at its peak (+384 MB above
the level before it, the state being 177 MB; +339 MB with the freed memory returned). Elsewhere
(macOS, Windows, musl) there is nothing to call and this does nothing.

PageBuffer holds the state llama.cpp copies out for a save in pages of its own, so that each
layer's K and V rows are let go once they are read: the state shrinks while the encoder's
working memory (a layer per core) is held, instead of both staying to the end.

save_memory_budget bounds that working memory: by default a quarter of the memory the system
has available when the save starts (so that a save of a large state on many cores does not
hold a layer per core it cannot afford: a layer being encoded holds about 7 times its rows,
state_file.LAYER_WORKING_SET); NEXUS_GGUF_SAVE_MEMORY=F bounds it to F times the state instead
(0.25: on SmolLM2 at 7680 tokens the first layers then encode one at a time, the save peaks
24% above the state instead of 31%, and encoding takes ~1.2x as long), `none` leaves it
unbounded. The rows given back are added to the budget as they come, each K or V as soon as
its values have been read out of it."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading
from typing import Optional

import numpy as np

from .errors import ConfigError

@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (other systems; musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    f.argtypes, f.restype = [ctypes.c_size_t], ctypes.c_int
    return f


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc malloc_trim(0): every arena). True
    where that was done."""
    f = _malloc_trim()
    if f is None:
        return False
    f(0)
    return True


class PageBuffer:
    """`size` bytes of zeroed private anonymous memory (`array`, uint8) whose whole pages under a
    view can be given back (release; Linux reads them as zeros afterwards). Where the system
    has no private anonymous maps or no MADV_DONTNEED, release does nothing."""

    def __init__(self, size: int):
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        # private: given-back pages are freed (a shared map's would stay in memory, unmapped)
        self._private = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
        self._map = mmap.mmap(-1, max(int(size), 1), **({"flags": flags} if self._private else {}))
        self.array = np.frombuffer(self._map, np.uint8)[: int(size)]
        self._base = self.array.ctypes.data
        self._page = mmap.PAGESIZE
        self.released = 0  # bytes given back
        self._lock = threading.Lock()

    def release(self, view: np.ndarray) -> int:
        """Give back the whole pages that the bytes of `view` (a contiguous array into `array`;
        anything else is left alone) lie on, which nothing else may read any more. Returns the
        bytes given back."""
        advise = getattr(self._map, "madvise", None)
        flag = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None or flag is None or not self._private or not isinstance(view, np.ndarray) or not view.flags.c_contiguous:
            return 0
        start = view.ctypes.data - self._base
        end = start + view.nbytes
        if start < 0 or end > self.array.size:
            return 0  # not in this buffer (a state with cells evicted holds copies)
        first = -(-start // self._page) * self._page
        last = end // self._page * self._page
        if last <= first:
            return 0
        advise(flag, first, last - first)
        with self._lock:  # called from the encoding threads
            self.released += last - first
        return last - first


def save_memory_budget(state_bytes: int) -> Optional[int]:
    """Bytes the layers a save is encoding may hold at once beyond the state (None: no bound):
    NEXUS_GGUF_SAVE_MEMORY times state_bytes where that is set to a number (`none`: no bound),
    else a quarter of the memory available now (None where the system does not say)."""
    value = os.environ.get("NEXUS_GGUF_SAVE_MEMORY", "").strip()
    if value.lower() == "none":
        return None
    if value:
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0 <= fraction < float("inf"):
            raise ConfigError(f"NEXUS_GGUF_SAVE_MEMORY={value!r} is not a fraction of the state (e.g. 0.25) or 'none'")
        return int(fraction * state_bytes)
    available = _available_memory()
    return None if available is None else available // 4


def _available_memory() -> Optional[int]:
    """Bytes of memory the system can give without swapping (Linux MemAvailable; elsewhere the
    free pages sysconf reports), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
