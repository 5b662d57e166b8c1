"""Memory a save gives back: the heap's freed pages (heap.release_freed_memory) and each layer's
rows of the state once its sections are made (heap.PageBuffer), without changing a byte."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import open_llama, prompt_tokens

import nexus_gguf as ng
from nexus_gguf import format as fmt
from nexus_gguf import heap

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory from /proc (Linux)")


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@linux
def test_freed_heap_memory_is_given_back():
    assert heap.release_freed_memory()  # glibc: malloc_trim is there


@linux
def test_page_buffer_gives_back_whole_pages_under_a_view_only():
    size = 32 << 20
    buf = heap.PageBuffer(size)
    a = buf.array
    assert a.size == size and not a.any()
    a[:] = 7
    before = _resident()
    rows = a[(1 << 20) + 100 : (31 << 20) - 100].reshape(-1, 4)  # starts and ends inside a page
    buf.release(rows)
    assert buf.released == (30 << 20) - 2 * 4096  # the two partial pages stay
    assert before - _resident() >= (28 << 20)
    assert (a[(1 << 20) + 4096 : (31 << 20) - 4096] == 0).all()  # given back: reads as zeros
    assert (a[: (1 << 20) + 4096] == 7).all() and (a[(31 << 20) - 4096 :] == 7).all()
    buf.release(np.ones(1 << 20, np.uint8))  # not in the buffer
    buf.release(a[::2])  # not contiguous
    buf.release(a[10:20])  # within one page
    assert buf.released == (30 << 20) - 2 * 4096


def test_a_save_gives_back_each_layer_after_coding_it_and_writes_the_same_bytes(smollm2_path, prompt_text, tmp_path,
                                                                               monkeypatch):
    """The rows are let go only once their sections are made: a save that keeps them all
    writes the same sections (a layer let go too early would be coded as zeros)."""
    llm = open_llama(smollm2_path, n_ctx=1024)
    llm.eval(prompt_tokens(llm, prompt_text * 4, 900))
    released = []
    release = heap.PageBuffer.release

    def counting(self, view):
        release(self, view)
        released.append(self.released)

    monkeypatch.setattr(heap.PageBuffer, "release", counting)
    raw = ng.save_state(llm, tmp_path / "released.nxkv", "high").raw_bytes
    assert len(released) == 2 * 30 and released[-1] > 0.8 * raw
    monkeypatch.setattr(heap.PageBuffer, "release", lambda self, view: None)
    ng.save_state(llm, tmp_path / "kept.nxkv", "high")
    a, b = fmt.NxkvFile.open(tmp_path / "released.nxkv"), fmt.NxkvFile.open(tmp_path / "kept.nxkv")
    assert a.names() == b.names()
    for name in a.names():
        assert bytes(a.section(name)) == bytes(b.section(name)), name
