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


@pytest.mark.parametrize("budget, preset", [("none", "high"), ("0", "high"), ("0.25", "high"), ("none", "lossless")])
def test_a_save_gives_back_each_layer_after_coding_it_and_writes_the_same_bytes(smollm2_path, prompt_text, tmp_path,
                                                                               monkeypatch, budget, preset):
    """The rows are let go once nothing reads them (the value path: once read into values of
    their own; the lossless one: once their section is made), and within a memory budget the
    layers encode as many at a time as it holds: a save that keeps every row and codes on all
    cores writes the same sections (rows let go too early would be coded as zeros)."""
    import threading

    from nexus_gguf import backends, state_file

    llm = open_llama(smollm2_path, n_ctx=1024)
    llm.eval(prompt_tokens(llm, prompt_text * 4, 900))
    released, at_start = [], []  # bytes given back; how many layers were encoding as each began
    release, encode_layers = heap.PageBuffer.release, state_file._encode_layers
    lock, running = threading.Lock(), [0]

    def counting(self, view):
        got = release(self, view)
        released.append(got)
        return got

    def tracking(encode_layer, layers, budget):
        def tracked(layer):
            with lock:
                running[0] += 1
                at_start.append(running[0])
            try:
                return encode_layer(layer)
            finally:
                with lock:
                    running[0] -= 1

        return encode_layers(tracked, layers, budget)

    monkeypatch.setattr(heap.PageBuffer, "release", counting)
    monkeypatch.setattr(state_file, "_encode_layers", tracking)
    monkeypatch.setenv("NEXUS_GGUF_SAVE_MEMORY", budget)
    raw = ng.save_state(llm, tmp_path / "released.nxkv", preset).raw_bytes
    assert len(released) == 2 * 30 and sum(released) > 0.8 * raw
    assert len(at_start) == 30
    if budget == "none":  # all cores
        assert max(at_start) == min(30, backends.threads())
    elif budget == "0":  # one layer at a time until the rows given back hold another's working set
        n = state_file.LAYER_WORKING_SET
        assert at_start[:n] == [1] * n
    elif backends.threads() > 1:  # one at a time while the budget holds only one, more as rows are given back
        assert at_start[0] == 1 and max(at_start) > 1
    monkeypatch.setattr(heap.PageBuffer, "release", lambda self, view: 0)
    monkeypatch.setenv("NEXUS_GGUF_SAVE_MEMORY", "none")
    ng.save_state(llm, tmp_path / "kept.nxkv", preset)
    a, b = fmt.NxkvFile.open(tmp_path / "released.nxkv"), fmt.NxkvFile.open(tmp_path / "kept.nxkv")
    assert a.names() == b.names()
    for name in a.names():
        assert bytes(a.section(name)) == bytes(b.section(name)), name


def test_save_memory_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEXUS_GGUF_SAVE_MEMORY", "none")
    assert heap.save_memory_budget(1000) is None
    monkeypatch.setenv("NEXUS_GGUF_SAVE_MEMORY", "0.25")
    assert heap.save_memory_budget(1000) == 250
    for bad in ("-1", "a quarter", "nan", "inf"):
        monkeypatch.setenv("NEXUS_GGUF_SAVE_MEMORY", bad)
        with pytest.raises(ng.ConfigError, match="NEXUS_GGUF_SAVE_MEMORY"):
            heap.save_memory_budget(1000)
    monkeypatch.delenv("NEXUS_GGUF_SAVE_MEMORY")
    if sys.platform.startswith("linux"):  # a quarter of what /proc/meminfo says is available
        assert 0 < heap.save_memory_budget(1000) <= heap._available_memory() // 4 + 1
