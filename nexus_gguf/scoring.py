"""Token importance for eviction, from the model's own attention.

The real scorer takes the post-RoPE queries of every layer for the last W prompt tokens (the
observation window), captured inside llama.cpp by llama_capture.capture_queries. Each window
query attends over all cached keys (softmax(q·k·scale), causal, GQA: query head h uses KV head
h // (n_head / n_head_kv)); the attention is summed over query heads and window tokens, averaged
over layers, and shared by all heads and layers, because the cache is shared.

The key-key proxy (the mean of the window's keys used as the query) needs no capture; it is
the fallback when capture is unavailable, and the header and report name it as such."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import llama_bridge as bridge
from .errors import NxkvError
from .llama_capture import capture_queries
from .llama_rotation import llama_rotation, toggle_llama_rotation
from .llama_state import LlamaState


def attention_importance(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, k_pos: np.ndarray, scale: float,
                         per_head: bool = False) -> np.ndarray:
    """Attention mass each cached key receives from the window queries of one layer, summed
    over query tokens and query heads: [n_cells], or with per_head [n_kv, n_cells] (each KV head
    summing its GQA group). q [W, n_head, d], k [n_cells, n_kv, d] (both post-RoPE)."""
    n_head, n_kv = q.shape[1], k.shape[1]
    group = n_head // n_kv
    out = np.zeros((n_kv, k.shape[0]))
    causal = k_pos[None, :] <= q_pos[:, None]  # [W, n_cells]
    for h in range(n_head):
        logits = (q[:, h, :].astype(np.float64) @ k[:, h // group, :].astype(np.float64).T) * scale
        logits = np.where(causal, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        out[h // group] += (w / w.sum(axis=1, keepdims=True)).sum(axis=0)
    return out if per_head else out.sum(axis=0)


@dataclass
class Scores:
    importance: np.ndarray  # float64 [n_cells] of the scored stream, higher = keep
    scorer: str  # what was actually used
    note: str = ""  # why the attention scorer was not used


def score_cells(llm, blob: bytes, state: LlamaState, tokens, window: int, scorer: str) -> Scores:
    """Importance of each cell of the state's first (full-attention) stream."""
    facts = bridge.model_facts(llm)
    cache = state.caches[0]
    streams = [s for s in cache.streams if s is not None]
    if len(streams) != 1:
        raise NxkvError("eviction supports one sequence in one stream")
    s = streams[0]
    pos = s.cells.pos.astype(np.int64)
    n = len(tokens)
    q_pos = np.arange(n - min(window, n), n)
    hd = facts.n_embd_head_k
    rot = llama_rotation(hd, "k")
    note = ""
    queries = None
    if scorer == "attention":
        try:
            queries = capture_queries(llm, blob, tokens, window)
        except NxkvError as e:
            note = f"query capture failed ({e}); used the key-key proxy"
    total = np.zeros(len(pos))
    for layer in s.layers:
        k = toggle_llama_rotation(layer.values("k"), layer.k_type, rot).reshape(len(pos), -1, hd)
        if queries is not None:
            q = queries[layer.model_layer]
        else:
            # proxy: the window's own keys, one query per KV head
            in_window = np.isin(pos, q_pos)
            q = k[in_window].mean(axis=0, keepdims=True)
        imp = attention_importance(q, q_pos if queries is not None else q_pos[-1:], k, pos, 1.0 / np.sqrt(hd))
        total += imp / imp.sum()
    return Scores(total / len(s.layers), "attention" if queries is not None else "key-proxy", note)
