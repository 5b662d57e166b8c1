"""numpy's OpenBLAS runs on one thread while the encoder's own threads run (blas_threads.py)."""

import threading
import time

import numpy as np
import pytest

from nexus_gguf import blas_threads


def _controls() -> list:
    """(set, get) of every OpenBLAS loaded, once no block is active (saves other tests left
    running in the background hold the count); skips where there is none."""
    controls = blas_threads._find()
    if not controls:
        pytest.skip("numpy's BLAS here is not an OpenBLAS this package can find")
    deadline = time.monotonic() + 30
    while blas_threads._depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert blas_threads._depth == 0
    return controls


def test_single_threaded_blas_sets_and_restores_the_count():
    controls = _controls()
    originals = [getter() for _, getter in controls]
    for setter, _ in controls:
        setter(2)
    if any(getter() != 2 for _, getter in controls):
        for (setter, _), original in zip(controls, originals):
            setter(original)
        pytest.skip("OpenBLAS here runs one thread at most")
    getter = lambda: max(g() for _, g in controls)  # noqa: E731  (every library loaded)
    try:
        with blas_threads.single_threaded_blas():
            assert getter() == 1
            with blas_threads.single_threaded_blas():  # nested: still one, not restored early
                assert getter() == 1
            assert getter() == 1
            a = np.ones((64, 64))
            assert (a @ a == 64).all()  # BLAS still computes
        assert getter() == 2
        # blocks on two threads at once share the setting; the last one out restores it
        inside, release = threading.Barrier(2), threading.Event()

        def hold():
            with blas_threads.single_threaded_blas():
                inside.wait()
                release.wait()

        t = threading.Thread(target=hold)
        t.start()
        with blas_threads.single_threaded_blas():
            inside.wait()
        assert getter() == 1  # the other block still holds it
        release.set()
        t.join()
        assert getter() == 2
    finally:
        for (setter, _), original in zip(controls, originals):
            setter(original)


def test_an_error_inside_restores_the_count():
    controls = _controls()
    before = [getter() for _, getter in controls]
    with pytest.raises(RuntimeError):
        with blas_threads.single_threaded_blas():
            assert all(getter() == 1 for _, getter in controls)
            raise RuntimeError("encoder failed")
    assert [getter() for _, getter in controls] == before
