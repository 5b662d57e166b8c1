"""gguf_file.read_gguf_header against files written by the gguf package: long string arrays
(vocabularies, merges) are walked by their lengths, and a file cut anywhere is refused."""

import numpy as np
import pytest

from nexus_gguf import gguf_file
from nexus_gguf.errors import FormatError

gguf = pytest.importorskip("gguf")


def _write(path, n_strings: int) -> list[str]:
    w = gguf.GGUFWriter(str(path), "llama")
    strings = [f"tok{i}" * (1 + i % 5) for i in range(n_strings)]
    w.add_block_count(2)
    w.add_token_list(strings)  # longer than gguf_file keeps: skipped
    w.add_token_merges(["a b", "c d"])  # short: kept
    w.add_uint32("test.after_the_arrays", 7)
    w.add_tensor("t.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return strings


def test_long_string_arrays_are_skipped_and_what_follows_is_read(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, gguf_file._MAX_KEPT_ARRAY + 1000)
    h = gguf_file.read_gguf_header(path)
    assert h.metadata["tokenizer.ggml.tokens"] is None
    assert h.metadata["tokenizer.ggml.merges"] == ["a b", "c d"]
    assert h.metadata["test.after_the_arrays"] == 7 and h.metadata["llama.block_count"] == 2
    assert h.tensors == {"t.weight": ((4, 3), 0)}
    ref = gguf.GGUFReader(str(path))
    # the fingerprint covers everything up to the end of the tensor table, which ends where the
    # gguf package's reader finds the first tensor's name field ends plus its dims, type, offset
    assert h.header_bytes <= ref.data_offset and h.header_bytes > ref.data_offset - 64


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_a_file_cut_inside_a_long_string_array_is_refused(tmp_path, cut):
    path = tmp_path / "m.gguf"
    _write(path, gguf_file._MAX_KEPT_ARRAY + 1000)
    data = path.read_bytes()
    at = data.index(b"tok0")  # the vocabulary's first string
    span = len(data) - at
    cut_path = tmp_path / "cut.gguf"
    cut_path.write_bytes(data[: at + int(cut * span * 0.5)])  # inside the vocabulary
    with pytest.raises(FormatError, match="string array runs past the end"):
        gguf_file.read_gguf_header(cut_path)
