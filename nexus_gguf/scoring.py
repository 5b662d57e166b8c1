"""Token importance for eviction, from the model's own attention.

The real scorer takes the post-RoPE queries of every layer for the last W prompt tokens (the
observation window), captured inside llama.cpp by llama_capture.capture_queries. Each window
query attends over all cached keys (softmax(q·k·scale), causal, GQA: query head h uses KV head
h // (n_head / n_head_kv)); the attention is summed over query heads and window tokens, averaged
over layers, and shared by all heads and layers, because the cache is shared.

The reconstruction scorer (KVzip, arXiv 2505.23416) asks instead what the model needs to
repeat the prompt: in a context holding the saved state, it decodes a "repeat the text above"
prompt followed by the prompt itself, chunk by chunk, captures those queries, and scores each
cached key by the largest attention any of them gives it, per layer and KV head. Importance
that does not depend on which question comes later: what eviction and coarse steps need.

The key-key proxy (the mean of the window's keys used as the query) needs no capture; it is
the fallback when capture is unavailable, and the header and report name it as such."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import llama_bridge as bridge
from .errors import NxkvError
from .heap import release_freed_memory
from .llama_capture import CaptureContext, capture_queries
from .llama_files import KINDS as LLAMA_FILE_KINDS
from .llama_rotation import llama_rotation, toggle_llama_rotation
from .llama_state import LlamaState, write_sequence_file, write_state


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
    importance: Optional[np.ndarray]  # float64 [n_cells] of the scored stream, higher = keep (None: not asked)
    scorer: str  # what was actually used
    note: str = ""  # why the asked-for scorer was not used
    # model layer -> float64 [n_kv, head_dim] (query_energy), where asked for and captured
    query_energy: Optional[dict] = None


def query_energy(queries: dict, facts) -> dict[int, np.ndarray]:
    """model layer -> float64 [n_kv, head_dim]: the mean square of the captured post-RoPE queries
    [W, n_head, head_dim] over the window and each KV head's query group, summed over each RoPE
    pair (NORM: channels 2i, 2i + 1; NEOX: i, i + n_rot / 2). RoPE turns a pair's two channels
    into each other with the position, so only a pair's energy is the same at every position:
    how much an error in a cached key's pair costs the attention logits, on average."""
    group = facts.n_head // facts.n_head_kv
    mode, n_rot = facts.rope.get("type"), int(facts.rope.get("n_rot") or 0)
    out = {}
    for layer, q in queries.items():
        q = np.asarray(q, np.float64)
        _, n_head, d = q.shape
        e = (q**2).mean(axis=0).reshape(n_head // group, group, d).mean(axis=1)
        half = min(n_rot, d) // 2
        if mode == "norm" and half:
            pair = e[:, 0 : 2 * half : 2] + e[:, 1 : 2 * half : 2]
            e[:, 0 : 2 * half : 2], e[:, 1 : 2 * half : 2] = pair, pair
        elif mode == "neox" and half:
            pair = e[:, :half] + e[:, half : 2 * half]
            e[:, :half], e[:, half : 2 * half] = pair, pair
        out[int(layer)] = e
    return out


REPEAT_PROMPT = "\n\nRepeat the text above, word for word.\n\n"


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def reconstruction_importance(llm, blob: bytes, keys: dict, tokens, chunk: int, stride: int,
                              state: Optional[LlamaState] = None, span: int = 1024,
                              spool_dir: Optional[str] = None) -> np.ndarray:
    """float64 [n_cells]: for each cached key, the largest attention a query of the repeated
    prompt gives it (per layer and KV head, over the GQA group), each (layer, head) scaled to its
    largest score, averaged (one score per cell: the cache keeps or drops a cell in every layer
    at once; measured, steps per layer did worse). keys: model layer -> post-RoPE K [n_cells,
    n_kv, head_dim] of the cells at positions 0 .. n-1, as the cache holds them. The softmax runs
    over the prompt's cells only, not the repeat's own (an approximation of KVzip).

    With `span` (and the parsed `state`), each chunk is repeated after the first SINK_CELLS cells,
    the `span` cells before the chunk and the chunk itself, not after the whole prompt (positions
    kept, the repeat at the chunk's end): a cell is scored by the repeat of its own chunk, where
    the copying queries find it, and the side context holds a few chunks' cells, not the state
    (4096-token SmolLM2 prose, span 1024: 25 s against 33 s, and at half the cells evicted KLD
    0.060 against 0.080, recall the same; README)."""
    facts = bridge.model_facts(llm)
    n = len(tokens)
    repeat = bridge.tokenize(llm, REPEAT_PROMPT, add_bos=False)
    best = {layer: np.zeros((k.shape[1], k.shape[0]), np.float32) for layer, k in keys.items()}
    group = facts.n_head // facts.n_head_kv
    scale = np.float32(1.0 / np.sqrt(facts.n_embd_head_k))
    max_tokens = len(repeat) + chunk
    # (a state with a sliding-window cache too keeps all of it: its positions run to the prompt's end)
    local = span > 0 and state is not None and len(state.caches) == 1 and n > SINK_CELLS + span + chunk
    pos = np.arange(n)
    n_ctx = -(-(SINK_CELLS + span + chunk + max_tokens + 1) // 256) * 256 if local else n + max_tokens + 1
    with CaptureContext(llm, n_ctx, max_tokens) as cc:
        if not local:
            cc.set_state(blob)
        for c0 in range(0, n, chunk):
            part = list(tokens[c0 : c0 + chunk])
            seen, at = slice(None), n
            if local:  # the repeat goes right after the chunk (llama.cpp wants a sequence's positions to follow on)
                seen = np.flatnonzero((pos < SINK_CELLS) | ((pos >= c0 - span) & (pos < c0 + chunk)))
                cc.remove_from(0)
                with _spooled(lambda: state.keep_cells(seen), spool_dir) as cells:
                    cc.set_state(cells)
                at = c0 + len(part)
            queries = cc.decode(repeat + part, at)
            cc.remove_from(at)  # each chunk is repeated after the prompt alone
            for layer, k in keys.items():
                q = queries[layer][len(repeat) :: stride].astype(np.float32)  # [m, n_head, d]
                ks = k[seen]
                for h in range(facts.n_head):
                    kv = h // group
                    att = _softmax_rows((q[:, h, :] @ ks[:, kv, :].T) * scale)  # over the prompt's cells only
                    row = best[layer][kv]
                    row[seen] = np.maximum(row[seen], att.max(axis=0))
    total = np.zeros(n)
    for b in best.values():
        total += (b / np.maximum(b.max(axis=1, keepdims=True), 1e-30)).mean(axis=0)
    return total / len(best)


SINK_CELLS = 4  # the first positions, kept in a bounded capture: attention's sinks
SLOT_FILE = LLAMA_FILE_KINDS["slot"]  # llama_state_seq_save_file's magic and version, as llama_files reads them


def bounded_capture(state: LlamaState, window: int, context: int) -> tuple:
    """(kept, n_ctx) for capture_queries: the state of the first SINK_CELLS positions and the
    last `context` of its full-attention cache (positions kept, so RoPE and the causal mask are
    those of the prompt), for a context of n_ctx cells; (None, None) where that is the whole
    state, or where the state has a sliding-window cache too (its cells must all fit)."""
    streams = [s for s in state.caches[0].streams if s is not None]
    if len(state.caches) != 1 or len(streams) != 1:
        return None, None
    pos = streams[0].cells.pos.astype(np.int64)
    keep = np.flatnonzero((pos < SINK_CELLS) | (pos > pos.max() - max(context, window)))
    if keep.size >= pos.size:
        return None, None
    return state.keep_cells(keep), -(-(keep.size + window) // 256) * 256


@contextlib.contextmanager
def _spooled(take_cells: Callable[[], LlamaState], spool_dir: Optional[str]):
    """The cells take_cells() gives (its caller holding no other reference to them), as llama.cpp
    takes them (CaptureContext.set_state, capture_queries): the path of a sequence state file in
    spool_dir (None: the system's temporary directory), deleted afterwards, which llama.cpp reads
    a layer at a time, so the side context's cache is not held beside a copy of its cells
    (7680-token SmolLM2 state: 24 MB less at the capture's peak); a blob in memory where no file
    can be made."""
    cells = take_cells()
    try:
        fd, name = tempfile.mkstemp(prefix=".nxkv-capture-", suffix=".bin", dir=spool_dir)
    except OSError:  # nowhere to write it: from memory, as a blob
        blob, cells = write_state(cells), None
        yield blob
        return
    try:
        with open(fd, "wb") as f:  # closed before llama.cpp opens it by name (Windows)
            write_sequence_file(f, cells, *SLOT_FILE[:2])
        cells = None
        release_freed_memory()  # the cells' copy, before the side context reads them
        yield name
    finally:
        os.unlink(name)


def _capture_bounded(llm, state: LlamaState, tokens, window: int, context: int, spool_dir: Optional[str]) -> Optional[dict]:
    """capture_queries of bounded_capture's cells (None where that would be the whole state),
    handed to llama.cpp through _spooled."""
    kept, n_ctx = bounded_capture(state, window, context)
    if kept is None:
        return None
    holder = [kept]
    kept = None
    with _spooled(holder.pop, spool_dir) as cells:
        return capture_queries(llm, cells, tokens, window, n_ctx=n_ctx)


def score_cells(llm, blob: bytes, state: LlamaState, tokens, window: int, scorer: str, chunk: int = 1024,
                stride: int = 4, span: int = 1024, importance: bool = True, energy: bool = False, context: int = 0,
                exact_importance: bool = True, spool_dir: Optional[str] = None) -> Scores:
    """Importance of each cell of the state's first (full-attention) stream (unless not
    `importance`), and with `energy` the query energy of every layer (query_energy) from the
    last `window` prompt tokens' captured queries; captured over the first cells and the last
    `context` (bounded_capture) when only the energy is asked or the importance need not be
    exact (not `exact_importance`: the window's queries from the bounded context, their
    attention over every cell of the state; for steps, not for eviction). spool_dir: where a
    bounded capture's cells wait for llama.cpp (_capture_bounded)."""
    facts = bridge.model_facts(llm)
    n = len(tokens)
    notes = []
    queries = None
    if scorer == "attention" or energy:
        try:
            wanted = importance and scorer == "attention" and exact_importance  # queries that saw every cell
            queries = None if wanted or not context else _capture_bounded(llm, state, tokens, window, context, spool_dir)
            if queries is None:
                queries = capture_queries(llm, blob, tokens, window)
        except NxkvError as e:
            notes.append(f"query capture failed ({e})" + ("; used the key-key proxy" if importance and scorer == "attention" else "")
                         + ("; K not weighted by the queries" if energy else ""))
    energies = query_energy(queries, facts) if energy and queries is not None else None
    if scorer != "attention":
        queries = None  # captured for the energies only: the asked-for scorer judges the cells
    if not importance:
        return Scores(None, "attention" if energies is not None else "none", "; ".join(notes), energies)
    cache = state.caches[0]
    streams = [s for s in cache.streams if s is not None]
    if len(streams) != 1:
        raise NxkvError("eviction supports one sequence in one stream")
    s = streams[0]
    pos = s.cells.pos.astype(np.int64)
    q_pos = np.arange(n - min(window, n), n)
    hd = facts.n_embd_head_k
    rot = llama_rotation(hd, "k")
    if scorer == "reconstruct":
        keys = {layer.model_layer: toggle_llama_rotation(layer.values("k"), layer.k_type, rot).reshape(len(pos), -1, hd)
                for layer in s.layers}
        if np.array_equal(pos, np.arange(n)):
            try:
                return Scores(reconstruction_importance(llm, blob, keys, tokens, chunk, stride, state, span, spool_dir), "reconstruct",
                              "; ".join(notes),
                              energies)
            except NxkvError as e:
                notes.append(f"query capture failed ({e}); used the key-key proxy")
        else:
            notes.append("reconstruction scoring needs the cells of positions 0..n-1; used the key-key proxy")
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
    return Scores(total / len(s.layers), "attention" if queries is not None else "key-proxy", "; ".join(notes), energies)
