"""tools/bench.py's tiny Gemma 3 rows (`--tiny-gemma3`): the layout check the README quotes; the
speed table's memory figures, measured in a new process."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.llama


def _bench():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "bench.py")
    spec = importlib.util.spec_from_file_location("nexus_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_gemma3_rows_restore_every_cache():
    bench = _bench()
    rows = {r["preset"]: r for r in bench.tiny_gemma3(["lossless", "high", "max"], n_tokens=1700)}
    lossless, high, evicting = rows["lossless"], rows["high"], rows["max"]
    assert set(high["errors"]) == {"base k", "base v", "swa k", "swa v"}
    assert max(lossless["errors"].values()) == 0 and lossless["logits_max_diff"] == 0
    # E8 at 3.5 bits: about 0.27 * 2^(2.05 - 3.5) = 0.10 of the values' RMS (a few percent more by rate and distortion)
    assert all(0 < e < 0.15 for e in high["errors"].values()) and high["ratio"] > 4
    assert high["cells"] == lossless["cells"] and evicting["cells"]["base"] < lossless["cells"]["base"]
    table = bench.tiny_gemma3_table(list(rows.values()))
    assert table.count("\n") == 4 and "`high`" in table


def test_memory_is_measured_in_a_new_process(smollm2_path, prompt_text, tmp_path):
    """fresh_process_peak: a save (of a state restored from a lossless file) and a load, each
    the first in a new process; what they add is at least the raw state they hold. And
    fresh_process_load_seconds: how long such a load takes."""
    import nexus_gguf as ng
    from conftest import open_llama, prompt_tokens

    bench = _bench()
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 200))
    raw = ng.save_state(llm, tmp_path / "lossless.nxkv", "lossless").raw_bytes
    save = bench.fresh_process_peak(smollm2_path, 512, 2, "save", state=str(tmp_path / "lossless.nxkv"), preset="high",
                                    out=str(tmp_path / "high.nxkv"))
    load = bench.fresh_process_peak(smollm2_path, 512, 2, "load", path=str(tmp_path / "high.nxkv"))
    assert (tmp_path / "high.nxkv").stat().st_size > 0
    assert save >= raw and load >= raw
    with pytest.raises(RuntimeError, match="load memory measurement failed"):
        bench.fresh_process_peak(smollm2_path, 512, 2, "load", path=str(tmp_path / "missing.nxkv"))
    # and the time of a new process's first load (the same file), or why it could not be had
    assert 0 < bench.fresh_process_load_seconds(smollm2_path, 512, 2, str(tmp_path / "high.nxkv"), 1) < 60
    with pytest.raises(RuntimeError, match="first-load measurement failed"):
        bench.fresh_process_load_seconds(smollm2_path, 512, 2, str(tmp_path / "missing.nxkv"), 1)
