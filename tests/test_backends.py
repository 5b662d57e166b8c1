"""Every backend's kernels against the numpy reference."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nexus_gguf.backends import backend, backend_features, backend_name

OTHER_BACKENDS = ["native", "numba"]


def test_native_library_is_built():
    # pip install . compiles native/; a missing library must fail here, not hide behind Numba.
    if os.environ.get("NEXUS_GGUF_ALLOW_NO_NATIVE") == "1":
        pytest.skip("NEXUS_GGUF_ALLOW_NO_NATIVE=1")
    assert backend_features()["native"] == "available"
    assert backend_name("auto") == "native"


@pytest.mark.parametrize("name", OTHER_BACKENDS)
@pytest.mark.parametrize("element_size", [1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 7, 4099])
def test_byteplane_matches_reference(name, element_size, n):
    if backend_features()[name] != "available":
        pytest.skip(backend_features()[name])
    ref, impl = backend("reference"), backend(name)
    x = np.random.default_rng(n).integers(0, 256, n * element_size, dtype=np.uint8)
    planes = ref.byteplane_split(x, element_size)
    assert np.array_equal(impl.byteplane_split(x, element_size), planes)
    assert np.array_equal(impl.byteplane_merge(planes, element_size), x)
    assert np.array_equal(ref.byteplane_merge(planes, element_size), x)


def test_reference_byteplane_layout():
    x = np.array([1, 2, 3, 4, 5, 6], np.uint8)  # three 2-byte elements
    assert backend("reference").byteplane_split(x, 2).tolist() == [1, 3, 5, 2, 4, 6]


def test_unknown_backend_policy_is_an_error(monkeypatch):
    from nexus_gguf.errors import ConfigError

    monkeypatch.setenv("NEXUS_GGUF_BACKEND", "gpu-magic")
    with pytest.raises(ConfigError):
        backend()
