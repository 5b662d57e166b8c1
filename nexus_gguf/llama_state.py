"""llama.cpp state blobs <-> arrays, byte-exact both ways.

Covers what the pinned llama.cpp writes for attention KV caches (llama-context.cpp
state_write_data / state_seq_get_data, llama-kv-cache.cpp state_write / state_write_meta /
state_write_data, llama-kv-cache-iswa.cpp state_write):

    context blob   := u32 len, arch bytes, cache+            (llama_state_get_data)
    sequence blob  := u32 0xaf143cd8, i32 seq_id, cache+     (llama_state_seq_get_data)
    cache          := u32 n_stream, stream * n_stream        (iSWA: the base cache, then the SWA one)
    stream         := u32 cell_count, [cell_meta * cell_count, data]   (nothing more if empty)
    cell_meta      := i32 pos, u32 n_seq, [12-byte ext if M-RoPE/PLE], i32 seq_id * n_seq
    data           := u32 v_trans, u32 n_layer, k_layer * n_layer, v_layer * n_layer
    k_layer        := i32 type, u64 row_bytes, row_bytes * cell_count bytes
    v_layer        := as k_layer                                  (v_trans == 0)
                    | i32 type, u32 el_bytes, u32 n_embd_v, n_embd_v * cell_count * el_bytes
                                                                  (v_trans == 1: one row per channel)

Arrays are views into the blob where possible (no copies on parse).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

from .byte_reader import ByteReader
from .errors import StateLayoutError, UnsupportedModelError
from .ggml_types import GgmlType, ggml_type

SEQ_STATE_MAGIC = 0xAF143CD8
CELL_EXT_BYTES = 12  # llama_kv_cell_ext: i32 x, i32 y, i32 tok
_MAX_STREAMS = 1 << 16
_MAX_LAYERS = 1 << 12


@dataclass
class StateLayout:
    """What the blob itself does not say, taken from the model (see model_facts.state_layout).

    has_cell_ext: None lets the parser find out (it tries without the ext record, then with).
    cache_layers: per cache, the model layer index of each cache layer, if known.
    cache_sliding: per cache, whether its layers are sliding-window layers."""

    has_cell_ext: Optional[bool] = None
    cache_layers: Optional[list[list[int]]] = None
    cache_sliding: Optional[list[bool]] = None


@dataclass
class Cells:
    """Per-cell metadata of one stream, in cell order."""

    pos: np.ndarray  # int32 [n]
    seq_ids: list[np.ndarray]  # int32 arrays, one per cell
    ext: Optional[np.ndarray] = None  # int32 [n, 3] (x, y, tok) where the cache keeps it

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def to_bytes(self) -> bytes:
        n = len(self)
        if all(s.shape[0] == 1 for s in self.seq_ids):
            # fast path: every cell in one sequence, fixed-size records
            cols = [self.pos.astype("<i4").reshape(n, 1), np.ones((n, 1), "<i4")]
            if self.ext is not None:
                cols.append(self.ext.astype("<i4").reshape(n, 3))
            cols.append(np.array([s[0] for s in self.seq_ids], "<i4").reshape(n, 1))
            return np.concatenate(cols, axis=1).tobytes()
        parts = []
        for i in range(n):
            parts.append(struct.pack("<iI", int(self.pos[i]), self.seq_ids[i].shape[0]))
            if self.ext is not None:
                parts.append(self.ext[i].astype("<i4").tobytes())
            parts.append(self.seq_ids[i].astype("<i4").tobytes())
        return b"".join(parts)


@dataclass
class LayerKV:
    """One cache layer of one stream, in the layout llama.cpp stores it. K rows are cells; V rows
    are cells too unless v_trans (flash attention off), where V is stored as n_embd_v rows of
    n_cells elements. The layer knows its own layout: values() reads K or V as floats whatever
    the type and layout, with_values() writes them back."""

    cache_layer: int
    model_layer: Optional[int]
    sliding_window: bool
    k_type: GgmlType
    k: np.ndarray  # uint8 [n_cells, k_row_bytes]
    v_type: GgmlType
    v: np.ndarray  # uint8 [n_cells, v_row_bytes] or, transposed, [n_embd_v, n_cells * el_bytes]
    v_trans: bool = False

    @property
    def n_cells(self) -> int:
        return int(self.k.shape[0])

    def n_embd(self, kind: str) -> int:
        """Values per cell of K (kind 'k') or V ('v'): n_head_kv * head size."""
        if kind == "v" and self.v_trans:
            return int(self.v.shape[0])
        t, arr = (self.k_type, self.k) if kind == "k" else (self.v_type, self.v)
        return int(arr.shape[1]) // t.type_size * t.block_size

    def values(self, kind: str) -> np.ndarray:
        """float32 [n_cells, n_embd] of K (kind 'k') or V ('v')."""
        from .ggml_quants import dequantize

        if kind == "v" and self.v_trans:
            return np.ascontiguousarray(dequantize(self.v, self.v_type, self.n_cells).T)
        t, arr = (self.k_type, self.k) if kind == "k" else (self.v_type, self.v)
        return dequantize(arr, t, self.n_embd(kind))

    @classmethod
    def from_values(cls, cache_layer: int, model_layer: Optional[int], sliding_window: bool, k_type: GgmlType,
                    k: np.ndarray, v_type: GgmlType, v: np.ndarray, v_trans: bool) -> "LayerKV":
        """A layer holding float32 K and V [n_cells, n_embd], written as k_type / v_type in the
        layout v_trans."""
        from .ggml_quants import quantize

        if v_trans and not v_type.float_bytes:
            raise StateLayoutError(f"a transposed V cache cannot hold {v_type.name}")
        v_rows = quantize(np.ascontiguousarray(v.T), v_type.name) if v_trans else quantize(v, v_type.name)
        return cls(cache_layer, model_layer, sliding_window, k_type, quantize(k, k_type.name), v_type, v_rows, v_trans)

    def with_values(self, k: np.ndarray, v: np.ndarray, k_type: Optional[GgmlType] = None,
                    v_type: Optional[GgmlType] = None, v_trans: Optional[bool] = None) -> "LayerKV":
        """This layer holding float32 K and V [n_cells, n_embd] instead, written as k_type /
        v_type in the layout v_trans (default: the layer's own types and layout)."""
        return LayerKV.from_values(self.cache_layer, self.model_layer, self.sliding_window, k_type or self.k_type, k,
                                   v_type or self.v_type, v, self.v_trans if v_trans is None else v_trans)

    def take_cells(self, idx: np.ndarray) -> "LayerKV":
        """This layer holding only the cells idx, in that order."""
        if self.v_trans:
            el = self.v_type.type_size
            v = self.v.reshape(self.v.shape[0], self.n_cells, el)[:, idx, :].reshape(self.v.shape[0], -1)
        else:
            v = self.v[idx]
        return replace(self, k=np.ascontiguousarray(self.k[idx]), v=np.ascontiguousarray(v))


@dataclass
class Stream:
    cells: Cells
    layers: list[LayerKV]

    @property
    def v_trans(self) -> bool:
        return self.layers[0].v_trans

    def take_cells(self, idx: np.ndarray) -> "Stream":
        """This stream holding only the cells idx (positions and everything else kept)."""
        c = self.cells
        cells = Cells(c.pos[idx], [c.seq_ids[i] for i in idx], None if c.ext is None else c.ext[idx])
        return Stream(cells, [layer.take_cells(idx) for layer in self.layers])


@dataclass
class Cache:
    """One llama_kv_cache: `kv` for a plain model, `base` and `swa` for iSWA models."""

    name: str
    streams: list[Optional[Stream]]  # None: an empty stream (cell_count 0)


@dataclass
class LlamaState:
    kind: str  # "context" or "sequence"
    caches: list[Cache]
    arch: Optional[str] = None  # context blobs only
    seq_id: Optional[int] = None  # sequence blobs only
    has_cell_ext: bool = False

    @property
    def n_cells(self) -> int:
        """Cells of the first cache (the full-attention one): the prompt length for one sequence."""
        return sum(len(s.cells) for s in self.caches[0].streams if s is not None)

    def layers(self):
        """(cache, stream index, layer) for every stored layer."""
        for c in self.caches:
            for si, s in enumerate(c.streams):
                if s is not None:
                    for layer in s.layers:
                        yield c, si, layer

    def sequence(self, seq_id: int) -> "LlamaState":
        """The state of one sequence, as llama_state_seq_get_data writes it (llama-kv-cache.cpp
        state_write with a seq_id): in every stream, the cells that belong to it, each naming
        only it."""
        caches = []
        for c in self.caches:
            streams: list[Optional[Stream]] = []
            for s in c.streams:
                idx = np.array([] if s is None else [i for i, ids in enumerate(s.cells.seq_ids) if seq_id in ids], np.int64)
                if not idx.size:
                    streams.append(None)
                    continue
                t = s.take_cells(idx)
                t.cells.seq_ids = [np.array([seq_id], np.int32) for _ in range(idx.size)]
                streams.append(t)
            caches.append(Cache(c.name, streams))
        return LlamaState("sequence", caches, None, seq_id, self.has_cell_ext)

    def keep_cells(self, idx: np.ndarray) -> "LlamaState":
        """The state with only the cells idx of its first (full-attention) cache, in every
        stream of it; other caches (sliding-window ones hold only the window) stay whole."""
        first = Cache(self.caches[0].name, [None if s is None else s.take_cells(idx) for s in self.caches[0].streams])
        return replace(self, caches=[first] + list(self.caches[1:]))

    @property
    def n_pos(self) -> int:
        """One more than the largest position stored (where the next token goes)."""
        best = -1
        for c in self.caches:
            for s in c.streams:
                if s is not None and len(s.cells):
                    best = max(best, int(s.cells.pos.max()))
        return best + 1


def _reader(blob) -> ByteReader:
    return ByteReader(blob, "state blob", StateLayoutError)


def _parse_cells(r: ByteReader, n: int, has_ext: bool) -> Cells:
    rec = 4 * (3 + (3 if has_ext else 0))
    # Fast path: all cells hold exactly one sequence (fixed-size records); checked, not assumed.
    if n * rec <= r.remaining():
        a = np.frombuffer(r.buf, dtype="<i4", count=n * rec // 4, offset=r.pos).reshape(n, rec // 4)
        if np.all(a[:, 1] == 1):
            r.take(n * rec, "cell metadata")
            ext = a[:, 2:5].astype(np.int32) if has_ext else None
            seqs = a[:, -1].astype(np.int32)
            return Cells(a[:, 0].astype(np.int32), [seqs[i : i + 1] for i in range(n)], ext)
    pos = np.empty(n, np.int32)
    ext = np.empty((n, 3), np.int32) if has_ext else None
    seq_ids = []
    for i in range(n):
        pos[i] = r.i32("cell position")
        n_seq = r.u32("cell sequence count")
        if n_seq > 1 << 16:
            raise StateLayoutError(f"cell {i} claims {n_seq} sequences")
        if has_ext:
            ext[i] = np.frombuffer(r.take(CELL_EXT_BYTES, "cell ext"), "<i4")
        seq_ids.append(np.frombuffer(r.take(4 * n_seq, "cell sequence ids"), "<i4").astype(np.int32))
    return Cells(pos, seq_ids, ext)


def parse_cells(data, n: int, has_ext: bool) -> Cells:
    """Cell records on their own (as stored in a .nxkv cells section)."""
    r = _reader(data)
    cells = _parse_cells(r, n, has_ext)
    if r.remaining():
        raise StateLayoutError(f"{r.remaining()} bytes after {n} cell records")
    return cells


def _parse_stream(r: ByteReader, n_cells: int, has_ext: bool, layer_ids, sliding: bool) -> Stream:
    cells = _parse_cells(r, n_cells, has_ext)
    v_trans = r.u32("v_trans")
    if v_trans not in (0, 1):
        raise StateLayoutError(f"v_trans flag is {v_trans}, expected 0 or 1")
    n_layer = r.u32("layer count")
    if n_layer == 0 or n_layer > _MAX_LAYERS:
        raise StateLayoutError(f"implausible layer count {n_layer}")
    if layer_ids is not None and len(layer_ids) != n_layer:
        layer_ids = None  # the model's layer map does not fit this cache: leave layers unnamed
    ks = []
    for il in range(n_layer):
        t = ggml_type(r.i32("K type"))
        row = r.u64("K row size")
        if row == 0 or row % t.type_size:
            raise StateLayoutError(f"K row of {row} bytes is not a whole number of {t.name} blocks")
        ks.append((t, r.array(row * n_cells, "K rows").reshape(n_cells, row)))
    layers = []
    for il in range(n_layer):
        t = ggml_type(r.i32("V type"))
        if not v_trans:
            row = r.u64("V row size")
            if row == 0 or row % t.type_size:
                raise StateLayoutError(f"V row of {row} bytes is not a whole number of {t.name} blocks")
            v = r.array(row * n_cells, "V rows").reshape(n_cells, row)
        else:
            el = r.u32("V element size")
            n_embd_v = r.u32("V channel count")
            if t.block_size != 1 or el != t.type_size:
                raise StateLayoutError(f"transposed V of type {t.name} with {el}-byte elements")
            if n_embd_v == 0 or n_embd_v > 1 << 20:
                raise StateLayoutError(f"implausible V width {n_embd_v}")
            v = r.array(n_embd_v * n_cells * el, "V columns").reshape(n_embd_v, n_cells * el)
        kt, k = ks[il]
        layers.append(LayerKV(il, None if layer_ids is None else int(layer_ids[il]), sliding, kt, k, t, v, bool(v_trans)))
    return Stream(cells, layers)


def _parse_cache(r: ByteReader, name: str, has_ext: bool, layer_ids, sliding: bool) -> Cache:
    n_stream = r.u32("stream count")
    if n_stream == 0 or n_stream > _MAX_STREAMS:
        raise StateLayoutError(f"implausible stream count {n_stream}")
    streams: list[Optional[Stream]] = []
    for _ in range(n_stream):
        n_cells = r.u32("cell count")
        if n_cells == 0:
            streams.append(None)
            continue
        if n_cells * 12 > r.remaining():
            raise StateLayoutError(f"cell count {n_cells} does not fit in the remaining blob")
        streams.append(_parse_stream(r, n_cells, has_ext, layer_ids, sliding))
    return Cache(name, streams)


def _parse_with(blob, layout: StateLayout, has_ext: bool, kind: str) -> LlamaState:
    r = _reader(blob)
    arch = seq_id = None
    if kind == "sequence":
        magic = r.u32("magic")
        if magic != SEQ_STATE_MAGIC:
            raise StateLayoutError(f"not a sequence state (magic {magic:#x})")
        seq_id = r.i32("sequence id")
    else:
        n = r.u32("arch length")
        if n > 256:
            raise StateLayoutError(f"implausible arch string length {n}")
        arch = bytes(r.take(n, "arch")).decode("utf-8", errors="strict")
    layers = layout.cache_layers or []
    sliding = layout.cache_sliding or []
    caches = []
    while r.remaining() and len(caches) < 2:
        i = len(caches)
        lids = layers[i] if i < len(layers) else None
        swa = sliding[i] if i < len(sliding) else (i == 1)
        caches.append(_parse_cache(r, "kv", has_ext, lids, swa))
    if r.remaining():
        raise StateLayoutError(f"{r.remaining()} bytes left after the last cache")
    if not caches:
        raise StateLayoutError("the state holds no memory (no KV cache)")
    if len(caches) == 2:
        caches[0].name, caches[1].name = "base", "swa"
    return LlamaState(kind, caches, arch, seq_id, has_ext)


def parse_state(blob, kind: str = "context", layout: Optional[StateLayout] = None) -> LlamaState:
    """Parse a blob from llama_state_get_data (kind="context") or llama_state_seq_get_data
    (kind="sequence"). Raises StateLayoutError on anything it does not understand."""
    if kind not in ("context", "sequence"):
        raise ValueError(f"kind must be 'context' or 'sequence', not {kind!r}")
    layout = layout or StateLayout()
    tries = [layout.has_cell_ext] if layout.has_cell_ext is not None else [False, True]
    err = None
    for has_ext in tries:
        try:
            return _parse_with(blob, layout, has_ext, kind)
        except StateLayoutError as e:
            err = err or e
    raise err


def _emit_cache(out: list, cache: Cache) -> None:
    out.append(struct.pack("<I", len(cache.streams)))
    for s in cache.streams:
        if s is None:
            out.append(struct.pack("<I", 0))
            continue
        n = len(s.cells)
        out.append(struct.pack("<I", n))
        out.append(s.cells.to_bytes())
        if any(layer.v_trans != s.v_trans for layer in s.layers):
            raise StateLayoutError("the layers of one stream disagree on V's layout")
        out.append(struct.pack("<II", int(s.v_trans), len(s.layers)))
        for layer in s.layers:
            if layer.k.shape[0] != n:
                raise StateLayoutError("K rows and cells disagree")
            out.append(struct.pack("<iQ", layer.k_type.id, layer.k.shape[1]))
            out.append(layer.k)
        for layer in s.layers:
            if not s.v_trans:
                out.append(struct.pack("<iQ", layer.v_type.id, layer.v.shape[1]))
            else:
                el = layer.v_type.type_size
                if layer.v.shape[1] != n * el:
                    raise StateLayoutError("transposed V columns and cells disagree")
                out.append(struct.pack("<iII", layer.v_type.id, el, layer.v.shape[0]))
            out.append(layer.v)


def _pieces(state: LlamaState) -> list:
    """The blob in order: bytes, and each layer's K and V rows as the arrays themselves."""
    out: list = []
    if state.kind == "sequence":
        out.append(struct.pack("<Ii", SEQ_STATE_MAGIC, state.seq_id))
    else:
        arch = (state.arch or "").encode()
        out.append(struct.pack("<I", len(arch)))
        out.append(arch)
    for c in state.caches:
        _emit_cache(out, c)
    return out


def write_state(state: LlamaState) -> bytes:
    """The exact bytes llama.cpp would have written for this state."""
    return b"".join(p if isinstance(p, bytes) else np.ascontiguousarray(p).data for p in _pieces(state))


def write_sequence_file(f, state: LlamaState, magic: int, version: int) -> int:
    """Write the sequence state `state` to the binary file object f as llama.cpp's sequence
    state file (llama_state_seq_save_file: magic, version, a token count of 0, then the blob
    without its own magic and sequence id), a piece at a time: no copy of the whole blob (what
    llama_files.LlamaFile.to_buffers writes of a blob held in memory). magic and version: a slot
    file's (llama_files.KINDS, which imports this module).
    Returns the bytes written."""
    if state.kind != "sequence":
        raise StateLayoutError("a sequence state file holds a sequence state")
    n = f.write(struct.pack("<III", magic, version, 0))
    for p in _pieces(state)[1:]:  # the first: the blob's magic and sequence id
        n += f.write(p if isinstance(p, bytes) else np.ascontiguousarray(p).data)
    return n


def state_buffer(skeleton: LlamaState) -> tuple[np.ndarray, LlamaState, Callable[[], None]]:
    """The blob of `skeleton` as one uint8 array, the state with each layer's K and V as writable
    views of their place in it, and a call that writes everything but the rows: a decoder fills
    the rows in place, then the call, and the buffer is what llama.cpp gets, with no second copy
    of the state. The skeleton's rows give only shapes (np.broadcast_to of one byte costs no
    memory)."""
    pieces = _pieces(skeleton)
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
    # uninitialised (np.empty), and the bytes between the rows written last: the decoders' threads
    # take the page faults of a large state as they write the rows. Written first, the few bytes
    # between each layer's rows made this thread fault nearly every page (huge pages: 2 MB each)
    # before any decoding: 0.16 s of a new process's first 4096-token load, when the kernel
    # compacts memory for them, ~15 ms of each later one
    buf = np.empty(size, np.uint8)
    views: dict[int, np.ndarray] = {}
    between: list[tuple[int, bytes]] = []
    offset = 0
    for p in pieces:
        if isinstance(p, bytes):
            between.append((offset, p))
            offset += len(p)
        else:
            views[id(p)] = buf[offset : offset + p.nbytes].reshape(p.shape)
            offset += p.nbytes

    def placed(stream: Optional[Stream]) -> Optional[Stream]:
        if stream is None:
            return None
        return Stream(stream.cells, [replace(L, k=views[id(L.k)], v=views[id(L.v)]) for L in stream.layers])

    def write_between() -> None:
        for at, p in between:
            buf[at : at + len(p)] = np.frombuffer(p, np.uint8)

    caches = [Cache(c.name, [placed(s) for s in c.streams]) for c in skeleton.caches]
    return buf, replace(skeleton, caches=caches), write_between


def check_supported_memory(is_recurrent: bool, is_hybrid: bool, arch: str = "") -> None:
    if is_recurrent or is_hybrid:
        what = "recurrent" if is_recurrent else "hybrid (attention + recurrent)"
        raise UnsupportedModelError(
            f"{arch or 'this model'} keeps a {what} memory; nexus-gguf stores attention KV caches only"
        )
