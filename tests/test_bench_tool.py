"""tools/bench.py's tiny Gemma 3 rows (`--tiny-gemma3`): the layout check the README quotes."""

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
    # E8 at 3.4 bits: about 0.27 * 2^(2.05 - 3.4) = 0.11 of the values' RMS
    assert all(0 < e < 0.15 for e in high["errors"].values()) and high["ratio"] > 4
    assert high["cells"] == lossless["cells"] and evicting["cells"]["base"] < lossless["cells"]["base"]
    table = bench.tiny_gemma3_table(list(rows.values()))
    assert table.count("\n") == 4 and "`high`" in table
