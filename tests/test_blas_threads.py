"""numpy's OpenBLAS runs on one thread while the encoder's own threads run (blas_threads.py)."""

import threading

import numpy as np
import pytest

from nexus_gguf import blas_threads


def test_single_threaded_blas_sets_and_restores_the_count():
    controls = blas_threads._find()
    if not controls:
        pytest.skip("numpy's BLAS here is not an OpenBLAS this package can find")
    setter, getter = controls[0]
    original = getter()
    setter(2)
    if getter() != 2:
        setter(original)
        pytest.skip("OpenBLAS here runs one thread at most")
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
        setter(original)


def test_an_error_inside_restores_the_count():
    controls = blas_threads._find()
    if not controls:
        pytest.skip("numpy's BLAS here is not an OpenBLAS this package can find")
    before = controls[0][1]()
    with pytest.raises(RuntimeError):
        with blas_threads.single_threaded_blas():
            raise RuntimeError("encoder failed")
    assert controls[0][1]() == before
