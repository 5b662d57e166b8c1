"""Decoding lattice-coded K/V sections as one batch: a whole file on a CUDA GPU (run), or a
layer at a time on the CPU library (run_native).

The host parses each section's stream container (one C call: entropy.StreamTable) and decodes the
small streams (scales, channel means, sink rows; kilobytes), computes the steps and the RoPE
angles as the stages do, and builds one batch (prepare; a section's ~60 point streams registered
as arrays, not one by one): every rANS lane of every section, the point streams' places, the
per-section recipe. The rANS lanes are decoded (on the GPU a thread per lane and chunk), then
each head vector of each cell is made by native/core/section.h (lattice point, sink rows,
inverse Hadamard, RoPE), checked and written as f16 or f32 rows in the cache's layout, straight
into the llama.cpp state buffer. The same core code on both, the same float operations as the
stages: the rows are the same bits (tests/test_cuda.py, tests/test_golden.py). reference_decode
is the numpy reference of the batch.

What it covers: the value path of the presets (stages rope?, hadamard?, lattice, entropy) into
f16 or f32 caches with head sizes up to 512, the lattice's PCA transform, component classes, head
groups and importance-aware steps (a column table per step bucket, a cell map) included. Anything
else (quantized caches, delta coding) decodes stage by stage; unsupported() says why."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import FormatError
from .backends import native_host
from .backends.reference import n_lane_tasks
from .stages import TensorInfo
from .stages.entropy import (DTYPE_CODES, DTYPES, METHOD_RANS, METHOD_RANS_LANES, METHOD_ZSTD, N_RECORD_FIELDS, REC_DTYPE, REC_BODY_AT,
                             REC_CHUNK, REC_FREQ0, REC_LANES, REC_LENGTH0, REC_LO, REC_METHOD, REC_N, REC_N_FREQS, REC_NDIM,
                             REC_RANS_OK, REC_SHAPE, Entropy, StreamTable, check_range, zstd_values)
from .stages.hadamard import Hadamard
from .stages.lattice import N_CLASSES, Lattice, column_classes
from .stages.rope import Rope

MAX_HEAD_DIM = 512
_POINT_TYPES = ("coset", "coord", "coord_last")  # the point streams (coset symbols uint8, coordinates int32)
_RANS_METHODS = (METHOD_RANS, METHOD_RANS_LANES)
_CODE_COSET, _CODE_COORD = DTYPE_CODES[np.dtype(np.uint8)], DTYPE_CODES[np.dtype(np.int32)]
_INT32 = (-(1 << 31), (1 << 31) - 1)


@dataclass
class SectionJob:
    """One K or V section to decode: its coded bytes and the rows of the state buffer it fills."""

    info: TensorInfo
    data: bytes
    rows: np.ndarray  # uint8, contiguous: n_cells * n_embd values of the cache type (or V^T)
    out_f16: bool
    transposed: bool


def value_stages(pipeline):
    """(rope, hadamard, lattice, entropy) of a value path the GPU can code, or why not (a string)."""
    stages = list(pipeline.stages)
    rope = stages.pop(0) if stages and isinstance(stages[0], Rope) else None
    had = stages.pop(0) if stages and isinstance(stages[0], Hadamard) else None
    if len(stages) != 2 or not isinstance(stages[0], Lattice) or not isinstance(stages[1], Entropy):
        return f"stages {[s.stage_id for s in pipeline.stages]} are not rope?, hadamard?, lattice, entropy"
    return rope, had, stages[0], stages[1]


def unsupported(pipeline, dims: dict, types: set[str]) -> Optional[str]:
    """Why this file's K/V sections cannot be decoded as a batch (on the GPU or the CPU library:
    the same conditions), or None (cuda_encode adds its own for the GPU's encoder)."""
    got = value_stages(pipeline)
    if isinstance(got, str):
        return got
    rope, _, lattice, _ = got
    if lattice.scale_scope == "head" and lattice.scale_block:
        return "per-head scales with scale blocks are coded on the CPU"
    bad = sorted(types - {"f16", "f32"})
    if bad:
        return f"caches of type {', '.join(bad)} are coded on the CPU (the GPU reads and writes f16 and f32 rows)"
    for kind in ("k", "v"):
        d = int(dims[f"head_dim_{kind}"])
        if d > MAX_HEAD_DIM or d % 8 or d < 8:
            return f"head size {d} (the GPU kernel takes multiples of 8 up to {MAX_HEAD_DIM})"
    if rope is not None and rope.mode in ("norm", "neox") and rope.n_rot > int(dims["head_dim_k"]):
        return "RoPE over more than the head size"
    return None


class _Batch:
    """The arrays of one nxkv_cuda_batch, built section by section."""

    def __init__(self, defer_basis: bool):
        self.payload: list[np.ndarray] = []  # each section's StreamTable payload, once
        self.payload_size = 0
        self.values: list[np.ndarray] = []  # their rANS frequencies and lane lengths
        self.n_values = 0
        self.last_table, self.payload0, self.values0 = None, 0, 0  # the table rans_streams last took, where it went
        self.streams: list[np.ndarray] = []  # rows of nxkv_cuda_rans_stream fields, out0 relative to the rANS area
        self.stream_rows: list[tuple[StreamTable, list[int]]] = []  # each rANS stream's table and row, for its name
        self.n_rans_symbols = 0
        self.host: list[np.ndarray] = []  # symbols decoded here, placed after the rANS area
        self.n_host = 0
        self.steps: list[np.ndarray] = []
        self.n_steps = 0
        self.means: list[np.ndarray] = []
        self.n_means = 0
        self.sink_map: list[np.ndarray] = []
        self.n_sink_map = 0
        self.sinks: list[np.ndarray] = []
        self.n_sinks = 0
        self.cos: list[np.ndarray] = []
        self.sin: list[np.ndarray] = []
        self.n_trig = 0
        self.trig_at: dict = {}
        self.bases: list[np.ndarray] = []
        self.n_bases = 0
        self.sections: list[dict] = []
        self.jobs: list[SectionJob] = []
        self.defer_basis = defer_basis
        self.deferred_bases: list[tuple] = []  # see Prepared

    def _append(self, name: str, array: np.ndarray) -> int:
        at = getattr(self, f"n_{name}")
        getattr(self, name).append(array)
        setattr(self, f"n_{name}", at + array.size)
        return at

    def point_streams(self, table: StreamTable, rows: np.ndarray, coset: np.ndarray) -> tuple[np.ndarray, ...]:
        """(on the host, offset, lo) of each point stream, rows of `table` (coset: which hold
        coset symbols, the others coordinates): rANS streams of the types the encoder writes
        decode with the batch (registered here all at once: a section has about 60); any other
        (zstd for small or wide streams, empty ones, a damaged record's int16 coordinates or a
        table that does not parse) is decoded here with the CPU path's checks. Coordinates must
        fit int32 (as the CPU path requires); coset symbols are checked by the kernel or here."""
        r = table.records[rows]
        method = r[:, REC_METHOD]
        rans = ((r[:, REC_N] > 0) & ((method == METHOD_RANS) | (method == METHOD_RANS_LANES)) & (r[:, REC_RANS_OK] != 0)
                & (r[:, REC_DTYPE] == np.where(coset, _CODE_COSET, _CODE_COORD)))
        lo = np.where(rans, r[:, REC_LO], 0)
        if (rans & ~coset & ((lo < _INT32[0]) | (lo + r[:, REC_N_FREQS] - 1 > _INT32[1]))).any():
            raise FormatError("lattice coordinates outside int32")
        offset = np.zeros(rows.size, np.int64)
        if rans.any():
            offset[rans] = self.rans_streams(table, rows[rans])
        for i in np.flatnonzero(~rans).tolist():
            offset[i] = self.host_stream(table.stream(int(rows[i])), table.info.name, bool(coset[i]))
        return ~rans, offset, lo

    def host_stream(self, stream, section: str, coset: bool) -> int:
        """Where a point stream decoded here puts its symbols (after the rANS area)."""
        fits = True  # the values fit the stream's type (else checked as CodedStream.decode checks them)
        if stream.method == METHOD_ZSTD:  # most of them (661 a 4096-token load): CodedStream.decode's checks, one copy
            values = zstd_values(stream.payload, stream.n, stream.where)
            kind = np.dtype(stream.dtype)
            fits = np.can_cast(values.dtype, kind)
        else:
            values = stream.decode().reshape(-1)
        if values.size and (not fits or coset or not np.can_cast(values.dtype, np.int32)):
            lo, hi = int(values.min()), int(values.max())  # one pass for every check
            if not fits:
                check_range(lo, hi, kind, stream.where)
            if coset and (lo < 0 or hi > 1):
                raise FormatError(f"{section}: lattice coset symbols must be 0 or 1")
            if lo < _INT32[0] or hi > _INT32[1]:
                raise FormatError("lattice coordinates outside int32")
        return self._append("host", values.astype(np.int32))

    def rans_streams(self, table: StreamTable, rows: np.ndarray) -> np.ndarray:
        """Registers rANS streams (rows of `table` whose tables parsed) for the batch's decoder;
        returns where each one's symbols (indices into its table) will be."""
        if table is not self.last_table:  # the table's bytes and values join the batch once
            self.payload0, self.values0 = self.payload_size, self.n_values
            self.payload.append(table.payload)
            self.payload_size += table.payload.size
            self.values.append(table.values)
            self.n_values += table.values.size
            self.last_table = table
        r = table.records[rows]
        n = r[:, REC_N]
        out0 = self.n_rans_symbols + np.cumsum(n) - n
        self.streams.append(np.stack([self.payload0 + r[:, REC_BODY_AT], self.values0 + r[:, REC_LENGTH0], n, r[:, REC_LANES],
                                      r[:, REC_CHUNK], self.values0 + r[:, REC_FREQ0], r[:, REC_N_FREQS], out0], axis=1))
        self.stream_rows.append((table, rows.tolist()))
        self.n_rans_symbols += int(n.sum())
        return out0

    def trig(self, rope: Rope, info: TensorInfo) -> int:
        key = (np.asarray(info.positions).tobytes(), bool(info.sliding))
        if key not in self.trig_at:
            cos, sin = rope._trig(np.asarray(info.positions), info.sliding, 1.0)
            self.trig_at[key] = self.n_trig
            self.cos.append(np.ascontiguousarray(cos, np.float64).reshape(-1))
            self.sin.append(np.ascontiguousarray(sin, np.float64).reshape(-1))
            self.n_trig += cos.size
        return self.trig_at[key]


def _class_layout(column_class: dict) -> dict:
    """Point stream -> (each column's class, the classes, their column counts, each column's
    place among its class's columns: the class's stream holds them in order)."""
    out = {}
    for name in _POINT_TYPES:
        cols = column_class[name]
        count_of = np.bincount(cols, minlength=N_CLASSES)
        classes = np.flatnonzero(count_of)
        counts = count_of[classes]
        rank = np.empty(cols.size, np.int64)
        rank[np.argsort(cols, kind="stable")] = np.arange(cols.size) - np.repeat(np.cumsum(counts) - counts, counts)
        out[name] = (cols, classes.tolist(), counts.tolist(), rank)
    return out


def _column_slots(g: int, layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 9 g columns of a cell's point row [coset g | coord 7 g | last g] as places in a
    table's point streams, in _point_keys's order (a stream per type, or per type and class
    with a layout): each column's stream (its place among the table's streams), its place among
    that stream's columns and the stream's column count (the row stride)."""
    if layout is None:  # one stream per type: its columns follow one another in each row
        widths = np.array([g, 7 * g, g])
        slot = np.repeat(np.arange(3), widths)
        return slot, np.arange(9 * g) - np.repeat(np.cumsum(widths) - widths, widths), widths[slot]
    slot, rank, width, k = [], [], [], 0
    for name in _POINT_TYPES:
        cols, classes, counts, rank_of = layout[name]
        place = np.zeros(N_CLASSES, np.int64)  # each class's stream among the table's
        place[classes] = np.arange(k, k + len(classes))
        count_of = np.zeros(N_CLASSES, np.int64)
        count_of[classes] = counts
        slot.append(place[cols])
        rank.append(rank_of)
        width.append(count_of[cols])
        k += len(classes)
    return np.concatenate(slot), np.concatenate(rank), np.concatenate(width)


def _stream_rows(table: StreamTable, info: TensorInfo, keys: list[str], shapes: list[tuple]) -> np.ndarray:
    """The table's rows of the streams `keys`, each of its shape, else a FormatError naming the
    first that is missing or not of its shape."""
    rows = np.array([table.index.get(key, -1) for key in keys], np.int64)
    r = table.records[np.maximum(rows, 0)] if table.names else np.zeros((len(keys), N_RECORD_FIELDS), np.int64)
    ok = rows >= 0
    ndim = np.array([len(x) for x in shapes], np.int64)
    ok &= r[:, REC_NDIM] == ndim
    for axis in range(int(ndim.max(initial=0))):
        ok &= (r[:, REC_SHAPE + axis] == np.array([x[axis] if axis < len(x) else 0 for x in shapes])) | (axis >= ndim)
    if not ok.all():
        i = int(np.argmin(ok))
        raise FormatError(f"{info.name}: lattice symbols {keys[i]!r} missing or not of shape {shapes[i]}")
    return rows


def _point_keys(tables: list[tuple[str, int]], g: int, layout) -> tuple[list, list, list]:
    """The point streams of column tables (suffix, m): their names, shapes and which hold coset
    symbols, table by table, [coset, coord, coord_last] in each, class by class where layout
    (_class_layout) is given."""
    keys, shapes, coset = [], [], []
    for suffix, m in tables:
        for name in _POINT_TYPES:
            if layout is None:
                keys.append(name + suffix)
                shapes.append((m, g, 7) if name == "coord" else (m, g))
                coset.append(name == "coset")
                continue
            for c, width in zip(layout[name][1], layout[name][2]):
                keys.append(f"{name}{suffix}.c{c}")
                shapes.append((m, width))
                coset.append(name == "coset")
    return keys, shapes, coset


def _point_columns(batch: _Batch, table: StreamTable, plan: "_PointPlan") -> tuple[np.ndarray, ...]:
    """(start, stride, lo, on host), each [table, column], of the 9 g columns of a cell's point
    row [coset g | coord 7 g | last g], per column table: the plan's point streams registered in
    one call, the columns of all tables made at once (one gather each)."""
    host, offset, lo = (x.reshape(plan.n_tables, -1) for x in batch.point_streams(table, plan.rows(), plan.coset))
    slot, rank, width = plan.slots
    return offset[:, slot] + rank, np.broadcast_to(width, (plan.n_tables, slot.size)), lo[:, slot], host[:, slot]


@dataclass
class _PointPlan:
    """Where a section's point streams split by step bucket or component class are, and how a
    cell's point row reads them. The column tables: one (its rows the cells) or one per step
    bucket present (its rows that bucket's cells in order)."""

    n_tables: int
    names: set  # the point streams' names (decoded with the batch, not as small streams)
    rows: Callable[[], np.ndarray]  # their records in _point_keys's order (FormatError: one missing or not of its shape)
    coset: np.ndarray  # bool per point stream: coset symbols (else coordinates)
    slots: tuple  # _column_slots's (slot, rank, width) per column
    cell_map: Optional[np.ndarray]  # (table, row) per cell, flat; None: one table


def _point_plan(streams: StreamTable, info: TensorInfo, n: int, g: int, cls: Optional[np.ndarray],
                buckets: Optional[np.ndarray]) -> _PointPlan:
    """The section's _PointPlan: by the C library (nxkv_point_layout) where it is in use and takes
    the section, else (and for the error a damaged section gets) by numpy."""
    layout = native_host("point_layout")
    got = None
    if layout is not None:
        roles = _point_roles(streams.names)
        got = layout(streams.records, roles, n, g, cls, buckets)
    if got is None:
        return _numpy_point_plan(streams, info, n, g, cls, buckets)
    rows, n_tables, slots, cell_map = got
    return _PointPlan(n_tables, {streams.names[r] for r in rows.tolist()}, lambda: rows, roles[rows, 0] == 0, slots, cell_map)


def _numpy_point_plan(streams: StreamTable, info: TensorInfo, n: int, g: int, cls: Optional[np.ndarray],
                      buckets: Optional[np.ndarray]) -> _PointPlan:
    """_point_plan in numpy (the readable reference of nxkv_point_layout)."""
    layout = None if cls is None else _class_layout(column_classes(cls))
    cell_map = None
    if buckets is None:
        tables = [("", n)]
    else:
        count_of = np.bincount(buckets)  # (bucket ids are small and not negative: checked)
        bucket_ids = np.flatnonzero(count_of)
        counts = count_of[bucket_ids]
        # each cell's table, in bucket order (uint8 where they fit, for argsort's radix sort below)
        table_of = (np.cumsum(count_of > 0) - 1).astype(np.uint8 if bucket_ids.size <= 256 else np.int64)[buckets]
        tables = [(f".{b}", m) for b, m in zip(bucket_ids.tolist(), counts.tolist())]
        row = np.empty(n, np.int64)  # each cell's place among its bucket's cells
        order = np.argsort(table_of, kind="stable")
        row[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        cell_map = np.stack([table_of.astype(np.int64).reshape(-1), row], axis=1).reshape(-1)
    keys, shapes, coset = _point_keys(tables, g, layout)
    return _PointPlan(len(tables), set(keys), lambda: _stream_rows(streams, info, keys, shapes), np.array(coset, bool),
                      _column_slots(g, layout), cell_map)


_ROLES: dict[tuple, np.ndarray] = {}  # a section's stream names -> their roles (a load's sections share a few dozen lists)


def _point_roles(names: list[str]) -> np.ndarray:
    """int32 [streams, 3]: _parse_point_role of each name."""
    key = tuple(names)
    got = _ROLES.get(key)
    if got is None:
        got = np.array([_parse_point_role(name) for name in names], np.int32).reshape(-1, 3)
        if len(_ROLES) < 1024:
            _ROLES[key] = got
    return got


def _parse_point_role(name: str) -> tuple[int, int, int]:
    """(point type: 0 coset, 1 coord, 2 coord_last, else -1; step bucket or -1; component class
    or -1) of a stream named as _point_keys names them (`coord`, `coord.3`, `coord.c2`,
    `coord.3.c2`: decimal numbers as Python writes them); (-1, -1, -1) for any other name."""
    none = (-1, -1, -1)
    parts = name.split(".")
    if parts[0] not in _POINT_TYPES:
        return none
    bucket = cls = -1
    rest = parts[1:]
    if rest and _decimal(rest[0]):
        bucket, rest = int(rest[0]), rest[1:]
    if rest and rest[0][:1] == "c" and _decimal(rest[0][1:]):
        cls, rest = int(rest[0][1:]), rest[1:]
    if rest or bucket > 255 or cls >= N_CLASSES:
        return none
    return _POINT_TYPES.index(parts[0]), bucket, cls


def _decimal(s: str) -> bool:
    """s is a number as str(int) writes one (what f"{b}" gave the encoder's names)."""
    return s.isascii() and s.isdigit() and (s == "0" or s[0] != "0")


def _section(batch: _Batch, job: SectionJob, stages) -> None:
    rope, had, lattice, entropy = stages
    info = job.info
    n, h, d = info.n_cells, info.n_heads, info.head_dim
    streams = entropy.stream_table(np.frombuffer(job.data, np.uint8), info)
    coding = lattice.coding_view(info)  # head groups as one head: hc vectors of dc values
    hc, dc = coding.n_heads, coding.head_dim
    g = h * d // 8
    want, sink = lattice.stream_shapes(coding)
    small = {}
    cls = None
    if lattice.uses_classes(info):
        if "class" not in streams:
            raise FormatError(f"{info.name}: component classes missing")
        small["class"] = cls = streams["class"].decode()
        if cls.shape != (hc, dc) or (cls.size and int(cls.max()) >= N_CLASSES):
            raise FormatError(f"{info.name}: component classes missing, not of shape {(hc, dc)} or above {N_CLASSES - 1}")
    buckets = None
    if "bucket" in streams:  # importance-aware steps: each step bucket's cells in streams of their own
        small["bucket"] = buckets = streams["bucket"].decode()
        lattice.check_buckets(buckets, coding)
        if buckets.size and int(buckets.min()) < 0:  # (a damaged record's signed type: no such streams)
            raise FormatError(f"{info.name}: step buckets below 0")
    by_column = buckets is not None or cls is not None
    plan = _point_plan(streams, info, n, g, cls, buckets) if by_column else None
    point_names = plan.names if by_column else set()
    for name, shape in want.items():
        if by_column and name in _POINT_TYPES:
            continue  # split by class or bucket: checked with the column tables
        if name not in streams or streams.shape(streams.index[name]) != shape:
            raise FormatError(f"{info.name}: lattice symbols {name!r} missing or not of shape {shape}")
    # every other stream is decoded here, as the CPU path decodes all: damage anywhere is found
    deferred = None  # the basis stream's row, decoded with the point streams (Prepared.deferred_bases)
    if batch.defer_basis and "basis" in want and "basis" in streams:
        row = streams.records[streams.index["basis"]]
        if row[REC_N] and row[REC_METHOD] in _RANS_METHODS and row[REC_RANS_OK]:  # shape checked above
            deferred = streams.index["basis"]
    small.update({name: streams.stream(i).decode() for i, name in enumerate(streams.names)
                  if name not in _POINT_TYPES and name not in point_names and name not in small and i != deferred})
    columns = cell_map = None  # with column tables: (start, stride, lo, on host) per column, per table
    if not by_column:
        host, offset, lo = batch.point_streams(streams, np.array([streams.index[k] for k in _POINT_TYPES]),
                                               np.array([k == "coset" for k in _POINT_TYPES]))
        area = ["host" if x else "rans" for x in host.tolist()]
        coset, coord, last = zip(area, offset.tolist(), lo.tolist())
    else:
        coset = coord = last = ("rans", 0, 0)  # unused: these sections address symbols by column
        columns = _point_columns(batch, streams, plan)
        cell_map = plan.cell_map
    per_cell = lattice.scale_scope != "head"
    block = (lattice.scale_block or d) if per_cell else dc
    if buckets is None:
        steps = lattice.group_steps(small["scale"], coding)
    else:  # a step per cell: its bucket's
        steps, per_cell = lattice.cell_steps(small["scale"], coding, buckets), True
    sec = {"n_cells": n, "n_heads": h, "head_dim": d, "step0": batch._append("steps", np.ascontiguousarray(steps, np.float64).reshape(-1)),
           "step_per_cell": int(per_cell), "scale_block": block, "mean0": -1, "sink_map0": -1, "sink0": 0,
           "hadamard": int(had is not None and not had.passes_through(info)), "rope": 0, "n_rot": 0, "trig0": 0,
           "out_f16": int(job.out_f16), "transposed": int(job.transposed), "points": (coset, coord, last),
           "basis": 0, "basis0": 0, "basis_shift": 0, "cscale0": -1, "by_class": int(columns is not None), "cols0": 0,
           "columns": columns, "cell_map": cell_map, "cell_map0": -1, "n_tables": plan.n_tables if by_column else 1,
           "head_group": h // hc}
    if "basis" in want:
        one = 1 << (lattice.basis_bits - 1)
        if deferred is not None:
            r = streams.records[deferred]
            out0 = int(batch.rans_streams(streams, np.array([deferred]))[0])
            batch.deferred_bases.append((len(batch.sections), out0, int(r[REC_LO]), int(r[REC_N]), np.dtype(DTYPES[int(r[REC_DTYPE])]),
                                         streams.where(deferred)))
            basis = np.zeros(int(r[REC_N]), np.float32)  # filled once the batch's streams are decoded
        else:
            basis = small["basis"]
            if basis.shape != (hc, dc, dc) or (basis.size and (int(basis.max()) > one or int(basis.min()) < -one)):
                raise FormatError(f"{info.name}: basis entries beyond {lattice.basis_bits} bits")
        sec.update(basis=1, basis0=batch._append("bases", np.ascontiguousarray(basis, np.float32).reshape(-1)),
                   basis_shift=lattice.basis_bits - 1)
        scale = lattice.channel_scale(small, coding, sink)
        if scale.size:
            sec["cscale0"] = batch._append("means", scale)
    if lattice.center:
        mean = small["mean"].astype(np.uint16).view(np.float16).astype(np.float64)
        sec["mean0"] = batch._append("means", mean.reshape(-1))
    if lattice.sinks and sink.any():
        rows = np.full(n, -1, np.int32)
        rows[sink] = np.arange(int(sink.sum()), dtype=np.int32)
        sec["sink_map0"] = batch._append("sink_map", rows)
        sec["sink0"] = batch._append("sinks", small["sink"].astype(np.uint16).reshape(-1))
    if rope is not None and not rope.passes_through(info):
        sec["rope"] = 1 if rope.mode == "norm" else 2
        sec["n_rot"] = rope.n_rot
        sec["trig0"] = batch.trig(rope, info)
    batch.sections.append(sec)
    batch.jobs.append(job)


@dataclass
class Prepared:
    """One nxkv_cuda_batch as numpy arrays: what the library (and its numpy reference,
    reference_decode) receives. streams: int64 rows (payload_offset, task0, n_symbols, lanes,
    chunk, freq0, n_freqs, out0) per rANS stream; sections: nxkv_cuda_section fields (dest aside:
    jobs[i].rows)."""

    arrays: dict[str, np.ndarray]
    streams: np.ndarray
    stream_rows: list[tuple[StreamTable, list[int]]]  # the streams' tables and rows there (stream_names)
    n_symbols: int
    host_symbols0: int
    sections: list[dict]
    jobs: list[SectionJob]
    # (section index, out0, lo, size, the stream's dtype, its name) of bases whose rANS stream
    # is among `streams`: the decoder fills arrays["bases"] from those symbols (fill_bases)
    # before the values are made
    deferred_bases: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def stream_names(self) -> list[str]:
        """Each rANS stream's name for errors (`section/stream`; made when asked for)."""
        return [table.where(i) for table, rows in self.stream_rows for i in rows]

    @property
    def nbytes(self) -> int:
        """The bytes the batch holds, but for the RoPE angles (the Rope stage's, shared by a
        stream's K sections)."""
        return self.streams.nbytes + sum(a.nbytes for k, a in self.arrays.items() if k not in ("cos", "sin"))


def prepare(pipeline, jobs: list[SectionJob], defer_basis: bool = False) -> Prepared:
    """The batch for `jobs` (FormatError for what the host can already see is damaged).
    defer_basis: the PCA bases' rANS streams are decoded with the point streams (by run_native
    or reference_decode, on the CPU library's worker threads) instead of here."""
    stages = value_stages(pipeline)
    assert not isinstance(stages, str), stages
    batch = _Batch(defer_basis)
    for job in jobs:
        _section(batch, job, stages)

    def array(parts: list[np.ndarray], dtype) -> np.ndarray:
        # one part (a layer's RoPE angles, 1 MB each at 4096 cells) is passed as it is: the
        # library only reads these (no load measured faster on a quiet machine, but busy ones
        # paid for the fresh pages)
        if len(parts) == 1:
            return np.ascontiguousarray(parts[0], dtype)
        return np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0), dtype)

    host0 = batch.n_rans_symbols
    values = array(batch.values, np.int64)  # the frequencies and the lane lengths: one array, both offsets index it
    sections = []
    columns, n_columns = [], 0
    for sec in batch.sections:
        sec = dict(sec)
        for prefix, (area, offset, lo) in zip(("coset", "coord", "last"), sec.pop("points")):
            sec[f"{prefix}0"] = offset + (host0 if area == "host" else 0)
            sec[f"{prefix}_lo"] = lo
        tables, cell_map = sec.pop("columns"), sec.pop("cell_map")
        if tables is not None:  # (symbol index at row 0, stride, lo) per column of the row, per table
            sec["cols0"] = n_columns
            start, stride, lo, host = tables
            columns.append(np.stack([start + host * host0, stride, lo], axis=2).reshape(-1))
            n_columns += columns[-1].size
        if cell_map is not None:  # (table, row) per cell
            sec["cell_map0"] = n_columns
            columns.append(cell_map)
            n_columns += cell_map.size
        sections.append(sec)
    arrays = {
        "payload": array(batch.payload, np.uint8), "task_lengths": values, "freqs": values,
        "host_symbols": array(batch.host, np.int32),
        "steps": array(batch.steps, np.float64), "means": array(batch.means, np.float64),
        "sink_map": array(batch.sink_map, np.int32), "sinks": array(batch.sinks, np.uint16),
        "cos": array(batch.cos, np.float64), "sin": array(batch.sin, np.float64),
        "bases": array(batch.bases, np.float32), "columns": array(columns, np.int64),
    }
    return Prepared(arrays, array(batch.streams, np.int64).reshape(-1, 8), batch.stream_rows, host0 + batch.n_host, host0, sections, batch.jobs,
                    batch.deferred_bases)


def fill_bases(prep: Prepared, symbols: np.ndarray) -> None:
    """The deferred bases (Prepared.deferred_bases) from their decoded symbols, with the check
    prepare makes of bases decoded on the host."""
    bases = prep.arrays["bases"]
    for i, out0, lo, size, dtype, where in prep.deferred_bases:
        s = prep.sections[i]
        if not size:
            continue
        got = symbols[out0 : out0 + size]
        low, high = int(got.min()) + lo, int(got.max()) + lo  # (Python ints: a damaged lo cannot wrap around)
        check_range(low, high, np.dtype(dtype), where)  # as CodedStream.decode: a damaged record's type is not widened
        one = 1 << s["basis_shift"]
        if high > one or low < -one:
            raise FormatError(f"{prep.jobs[i].info.name}: basis entries beyond {s['basis_shift'] + 1} bits")
        dest = bases[s["basis0"] : s["basis0"] + size]
        dest[...] = got  # symbols and entries are small integers: exact in float32
        dest += lo


def decode_sections(pipeline, jobs: list[SectionJob]) -> dict[str, float]:
    """Decode every job on the GPU into its rows; FormatError for a damaged section (no rows are
    written then). Returns the library's timings in milliseconds."""
    from .backends import note_used

    timings = run(prepare(pipeline, jobs))
    note_used("decode_sections", "cuda")
    return timings


def _buffer(ffi, kind: str, arr: np.ndarray, keep: list):
    """A cffi view of arr (NULL when empty), kept alive in `keep` for the call."""
    if not arr.size:
        return ffi.NULL
    p = ffi.from_buffer(kind, arr, require_writable=False)
    keep.append(p)
    return p


def _sections(ffi, prep: Prepared, keep: list):
    """The batch's nxkv_section array (nxkv.h), each pointing at its job's rows."""
    sections = ffi.new("nxkv_section[]", max(len(prep.sections), 1))
    for i, (sec, job) in enumerate(zip(prep.sections, prep.jobs)):
        s = sections[i]
        for key, value in sec.items():
            setattr(s, key, value)
        rows = job.rows
        want = job.info.n_cells * job.info.n_heads * job.info.head_dim * (2 if job.out_f16 else 4)
        if not rows.flags.c_contiguous or not rows.flags.writeable or rows.nbytes != want:
            raise FormatError(f"{job.info.name}: rows of {rows.nbytes} bytes do not fit its values")
        dest = ffi.from_buffer("uint8_t[]", rows)
        keep.append(dest)
        s.dest = ffi.cast("void *", dest)
    keep.append(sections)
    return sections


def run(prep: Prepared) -> dict[str, float]:
    """The library's nxkv_cuda_decode_sections on a prepared batch (bases decoded on the host:
    prepare's defer_basis is for the CPU library)."""
    from .backends import cuda

    if prep.deferred_bases:
        raise ValueError("the GPU batch takes its bases decoded on the host (prepare without defer_basis)")
    ffi, lib = cuda.load()
    keep = []  # cffi buffers must outlive the call

    def buf(kind: str, arr: np.ndarray):
        return _buffer(ffi, kind, arr, keep)

    streams = ffi.new("nxkv_cuda_rans_stream[]", max(len(prep.streams), 1))
    for i, (off, task0, n, lanes, chunk, freq0, n_freqs, out0) in enumerate(prep.streams.tolist()):
        s = streams[i]
        s.payload_offset, s.task0, s.n_symbols, s.lanes, s.chunk = off, task0, n, lanes, chunk
        s.freq0, s.n_freqs, s.out0 = freq0, n_freqs, out0
    sections = _sections(ffi, prep, keep)
    a = prep.arrays
    b = ffi.new("nxkv_cuda_batch *")
    b.payload, b.payload_size = buf("uint8_t[]", a["payload"]), a["payload"].size
    b.task_lengths, b.n_task_lengths = buf("int64_t[]", a["task_lengths"]), a["task_lengths"].size
    b.freqs, b.n_freqs = buf("int64_t[]", a["freqs"]), a["freqs"].size
    b.streams, b.n_streams = streams, len(prep.streams)
    b.n_symbols = prep.n_symbols
    b.host_symbols, b.n_host_symbols = buf("int32_t[]", a["host_symbols"]), a["host_symbols"].size
    b.bases, b.n_bases = buf("float[]", a["bases"]), a["bases"].size
    b.columns, b.n_columns = buf("int64_t[]", a["columns"]), a["columns"].size
    b.host_symbols0 = prep.host_symbols0
    b.steps, b.n_steps = buf("double[]", a["steps"]), a["steps"].size
    b.means, b.n_means = buf("double[]", a["means"]), a["means"].size
    b.sink_map, b.n_sink_map = buf("int32_t[]", a["sink_map"]), a["sink_map"].size
    b.sinks, b.n_sinks = buf("uint16_t[]", a["sinks"]), a["sinks"].size
    b.cos, b.sin, b.n_trig = buf("double[]", a["cos"]), buf("double[]", a["sin"]), a["cos"].size
    b.sections, b.n_sections = sections, len(prep.sections)
    stream_status = ffi.new("int32_t[]", max(len(prep.streams), 1))
    section_status = ffi.new("int32_t[]", max(len(prep.sections), 1))
    b.stream_status, b.section_status = stream_status, section_status
    err = ffi.new("char[]", 512)
    r = lib.nxkv_cuda_decode_sections(b, err, 512)
    if r == lib.NXKV_CUDA_ERR_CORRUPT:
        raise_corrupt(prep, list(stream_status[0 : len(prep.streams)]), list(section_status[0 : len(prep.sections)]))
    if r == lib.NXKV_CUDA_ERR_ARG:
        raise FormatError("the K/V sections' layout is inconsistent (the GPU decoder refused its arguments)")
    if r != lib.NXKV_CUDA_OK:
        raise cuda.CudaError(f"GPU decode failed: {ffi.string(err).decode(errors='replace')}")
    return dict(zip(("upload", "tables", "rans", "values", "download"), list(b.ms)))


_scratch = threading.local()


def _symbol_buffer(n: int) -> np.ndarray:
    """An int32 buffer of n symbols, reused by this thread's later batches (a layer's are ~7 MB: a
    fresh buffer each time is fresh pages for the kernel to clear). Every entry of the part
    handed out is written before it is read (rANS streams and host symbols cover it)."""
    have = getattr(_scratch, "symbols", None)
    if have is None or have.size < n:
        _scratch.symbols = have = np.empty(max(n, 1), np.int32)
    return have[:n]


def run_native(prep: Prepared) -> None:
    """The same batch on the CPU library: every rANS stream decoded by one call
    (nxkv_rans_decode_streams) into the symbol buffer, then nxkv_decode_values makes every
    section's rows in one pass over its head vectors (core/section.h, the code the GPU kernel
    runs)."""
    from .backends import native

    ffi, lib = native.load()
    a = prep.arrays
    symbols = _symbol_buffer(prep.n_symbols)
    symbols[prep.host_symbols0 : prep.host_symbols0 + a["host_symbols"].size] = a["host_symbols"]
    if len(prep.streams):
        table = np.ascontiguousarray(prep.streams, np.int64)  # nxkv_rans_stream: 8 int64 fields each
        status = np.zeros(len(prep.streams), np.int32)
        r = lib.nxkv_rans_decode_streams(
            ffi.from_buffer("uint8_t[]", a["payload"]), a["payload"].size, ffi.from_buffer("int64_t[]", a["task_lengths"]),
            a["task_lengths"].size, ffi.from_buffer("int64_t[]", a["freqs"]), a["freqs"].size,
            ffi.cast("nxkv_rans_stream *", ffi.from_buffer("int64_t[]", table)), len(prep.streams),
            ffi.from_buffer("int32_t[]", symbols), symbols.size, ffi.from_buffer("int32_t[]", status))
        if r == lib.NXKV_ERR_NOMEM:
            raise MemoryError("no memory for the rANS decoder's tables")
        if r != lib.NXKV_OK:
            raise FormatError("the K/V sections' rANS streams are inconsistent (the decoder refused its arguments)")
        if status.any():
            raise_corrupt(prep, list(status), [0] * len(prep.sections))
    fill_bases(prep, symbols)
    keep = []

    def buf(kind: str, arr: np.ndarray):
        return _buffer(ffi, kind, arr, keep)

    sections = _sections(ffi, prep, keep)
    v = ffi.new("nxkv_values *")
    v.symbols, v.n_symbols = buf("int32_t[]", symbols), symbols.size
    v.steps, v.n_steps = buf("double[]", a["steps"]), a["steps"].size
    v.means, v.n_means = buf("double[]", a["means"]), a["means"].size
    v.sink_map, v.n_sink_map = buf("int32_t[]", a["sink_map"]), a["sink_map"].size
    v.sinks, v.n_sinks = buf("uint16_t[]", a["sinks"]), a["sinks"].size
    v.cos, v.sin, v.n_trig = buf("double[]", a["cos"]), buf("double[]", a["sin"]), a["cos"].size
    v.bases, v.n_bases = buf("float[]", a["bases"]), a["bases"].size
    v.columns, v.n_columns = buf("int64_t[]", a["columns"]), a["columns"].size
    status = ffi.new("int32_t[]", max(len(prep.sections), 1))
    if lib.nxkv_decode_values(sections, len(prep.sections), v, status) != lib.NXKV_OK:
        raise FormatError("the K/V sections' layout is inconsistent (the decoder refused its arguments)")
    got = list(status[0 : len(prep.sections)])
    if any(got):
        raise_corrupt(prep, [0] * len(prep.streams), got)


def raise_corrupt(prep: Prepared, stream_status: list[int], section_status: list[int]) -> None:
    """The FormatError the CPU path raises for the first damaged stream or section."""
    for where, status in zip(prep.stream_names, stream_status):
        if status:
            raise FormatError(f"{where}: rANS stream is corrupt (a lane ends early or does not decode to its start state)")
    for job, status in zip(prep.jobs, section_status):
        if status == 1:
            raise FormatError(f"{job.info.name}: lattice coset symbols must be 0 or 1")
        if status == 2:
            raise FormatError(f"section {job.info.name!r} decodes to values that are not finite")
    raise FormatError("a K/V section is corrupt")


def reference_decode(prep: Prepared) -> None:
    """The numpy reference of nxkv_cuda_decode_sections (the readable truth the CUDA kernels are
    tested against, and a test of the batch itself on machines without a GPU): the same arrays,
    the CPU ops, the same rows."""
    with np.errstate(all="ignore"):  # values that are not finite are refused below, not warned about
        _reference_decode(prep)


def _reference_decode(prep: Prepared) -> None:
    from .backends import reference as ref
    from .stages.hadamard import power_of_two_blocks

    a = prep.arrays
    symbols = np.zeros(prep.n_symbols, np.int64)
    symbols[prep.host_symbols0 : prep.host_symbols0 + a["host_symbols"].size] = a["host_symbols"]
    stream_status = []
    for off, task0, n, lanes, chunk, freq0, n_freqs, out0 in prep.streams.tolist():
        n_tasks = n_lane_tasks(n, lanes, chunk)
        lengths = a["task_lengths"][task0 : task0 + n_tasks]
        data = a["payload"][off : off + int(lengths.sum())].tobytes()
        try:
            symbols[out0 : out0 + n] = ref.rans_decode_lanes(data, lengths, a["freqs"][freq0 : freq0 + n_freqs], n, lanes, chunk)
            stream_status.append(0)
        except ValueError:
            stream_status.append(-1)
    if any(stream_status):
        raise_corrupt(prep, stream_status, [0] * len(prep.sections))
    fill_bases(prep, symbols)
    section_status = []
    made = []
    for s in prep.sections:
        n, h, d = s["n_cells"], s["n_heads"], s["head_dim"]
        g = h * d // 8
        if s["by_class"]:
            tables = a["columns"][s["cols0"] : s["cols0"] + s["n_tables"] * 27 * g].reshape(s["n_tables"], 9 * g, 3)
            if s["cell_map0"] >= 0:  # each cell its table and row there
                table_of, at = a["columns"][s["cell_map0"] : s["cell_map0"] + 2 * n].reshape(n, 2).T
            else:
                table_of, at = np.zeros(n, np.int64), np.arange(n)
            table = tables[table_of]  # [n, 9 g, 3]
            row = symbols[table[:, :, 0] + at[:, None] * table[:, :, 1]] + table[:, :, 2]
            coset, coord, last = row[:, :g].reshape(-1), row[:, g : 8 * g].reshape(-1), row[:, 8 * g :].reshape(-1)
        else:
            coset = symbols[s["coset0"] : s["coset0"] + n * g] + s["coset_lo"]
            coord = symbols[s["coord0"] : s["coord0"] + 7 * n * g] + s["coord_lo"]
            last = symbols[s["last0"] : s["last0"] + n * g] + s["last_lo"]
        if coset.size and (coset.min() < 0 or coset.max() > 1):
            section_status.append(1)
            made.append(None)
            continue
        hc, dc = h // s["head_group"], d * s["head_group"]  # head groups as one head
        blocks = dc // s["scale_block"]
        rows = n * hc if s["step_per_cell"] else hc
        steps = a["steps"][s["step0"] : s["step0"] + rows * blocks].reshape(-1, hc, blocks)
        steps = np.broadcast_to(steps, (n, hc, blocks))
        group_step = np.repeat(steps.reshape(n, hc * blocks), s["scale_block"] // 8, axis=1)
        mean = a["means"][s["mean0"] : s["mean0"] + h * d] if s["mean0"] >= 0 else np.zeros(0)
        if s["basis"]:
            basis = a["bases"][s["basis0"] : s["basis0"] + hc * dc * dc].reshape(hc, dc, dc).astype(np.int16)
            scale = a["means"][s["cscale0"] : s["cscale0"] + h * d] if s["cscale0"] >= 0 else np.zeros(0)
            x = ref.basis_dequantize(coset.astype(np.uint8), coord.astype(np.int32), last.astype(np.int32), steps[:, :, 0],
                                     basis, s["basis_shift"], mean, scale).reshape(n, h, d)
        else:
            x = ref.lattice_dequantize(coset.astype(np.uint8), coord.astype(np.int32), last.astype(np.int32), group_step,
                                       mean).reshape(n, h, d)
        if s["sink_map0"] >= 0:
            row = a["sink_map"][s["sink_map0"] : s["sink_map0"] + n]
            sinks = a["sinks"][s["sink0"] :].view(np.float16)
            for c in np.flatnonzero(row >= 0):
                x[c] = sinks[row[c] * h * d : (row[c] + 1) * h * d].reshape(h, d)
        if s["hadamard"]:
            start = 0
            for block in power_of_two_blocks(d):
                x[..., start : start + block] = ref.hadamard_blocks(np.ascontiguousarray(x[..., start : start + block]), block)
                start += block
        if s["rope"]:
            half = s["n_rot"] // 2
            cos = a["cos"][s["trig0"] : s["trig0"] + n * half].reshape(n, half)
            sin = a["sin"][s["trig0"] : s["trig0"] + n * half].reshape(n, half)
            x = ref.rope_rotate(x, cos, sin, s["n_rot"], s["rope"] == 2)
        section_status.append(0 if np.isfinite(x).all() else 2)
        made.append(x.reshape(n, h * d))
    if any(section_status):
        raise_corrupt(prep, [0] * len(prep.streams), section_status)
    for s, job, x in zip(prep.sections, prep.jobs, made):
        x = np.ascontiguousarray(x.T) if s["transposed"] else x
        values = ref.f32_to_f16(x) if s["out_f16"] else x.astype("<f4")
        job.rows[...] = values.view(np.uint8).reshape(job.rows.shape)
