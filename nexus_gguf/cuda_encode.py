"""Encoding a stream's K/V sections on a CUDA GPU, all layers in one batch.

The GPU does the work that grows with the state: the rows are uploaded once, RoPE is removed and
the Hadamard rotation applied (a thread per head vector), the channel means and each head's sum
of squares are taken, the values are rounded to E8 points, the point streams are counted and
coded in interleaved rANS lanes, and only the coded bytes come back. The host keeps what the
file's layout and tables need, all small: the scale symbols and steps (numpy, as the CPU path),
the frequency tables (entropy.normalized_freqs), the sink, mean and scale streams, and the
section bytes (entropy.stream_record and friends), so a section is the CPU writer's bytes.

One difference is allowed and stated: each head's sum of squares is added up in a fixed tree on
the GPU, numpy adds in its own order; the scale symbol round(8 log2 rms) then differs only when
the two sums straddle a rounding boundary (a relative 1e-15 window), and the file stays valid
either way. (And a cache holding infinities gives NaN channel means whose bits the GPU's NaN may
not share; such a file is refused when loaded, from either writer.) Everything else is exact: the same float and double operations as the CPU library
(native/core), numpy's mean order for the channel means.

What it covers: the presets' value path (rope?, hadamard?, lattice with per-head RMS scales on
the log scale, entropy rANS) from f16 or f32 rows; unsupported() says why anything else is
encoded on the CPU. _ReferenceEngine is the numpy reference of the library's steps (the tests
run the whole batch through it on machines without a GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .backends.reference import n_lane_tasks
from .section_decode import unsupported as decode_unsupported
from .section_decode import value_stages
from .errors import ConfigError
from .stages import TensorInfo
from .stages.entropy import (MAX_ALPHABET, METHOD_EMPTY, METHOD_RANS, METHOD_RANS_LANES, lanes_table, normalized_freqs,
                             rans_table, stream_record)
from .stages.hadamard import power_of_two_blocks
from .stages.lattice import LOG_STEPS, LOG_ZERO

POINT_STREAMS = (("coset", np.uint8), ("coord", np.int32), ("coord_last", np.int32))


@dataclass
class EncodeJob:
    """One K or V section to encode from its rows in the state."""

    name: str
    info: TensorInfo
    rows: np.ndarray  # uint8, contiguous: the layer's K or V rows as llama.cpp stores them
    rows_f16: bool
    transposed: bool  # V stored as [n_embd, n_cells]


def unsupported(pipeline, dims: dict, types: set[str]) -> Optional[str]:
    """Why these sections cannot be encoded on the GPU, or None."""
    why = decode_unsupported(pipeline, dims, types)
    if why is not None:
        return why
    _, _, lattice, entropy = value_stages(pipeline)
    if lattice.token_steps:
        return "importance-aware steps (the bucket streams) are encoded on the CPU (the GPU decodes them)"
    if lattice.rdo:
        return "rate-distortion quantization (lattice rdo) runs on the CPU (the GPU decodes its points as any others)"
    if lattice.transform != "none" or lattice.classes or lattice.head_group != 1:
        # the basis fit (float64 eigenvectors) and the class split run on the host today
        return "the PCA transform, component classes and head groups are encoded on the CPU (the GPU decodes them)"
    if (lattice.scale_scope, lattice.scale_stat, lattice.scale_format, lattice.scale_block) != ("head", "rms", "log", 0):
        return "the GPU encoder takes one RMS scale per head on the log scale (the presets')"
    if entropy.coder != "rans":
        return "the zstd coder encodes on the CPU"
    if lattice.profile is not None:
        return "steps per layer from a bit profile are encoded on the CPU"
    return None


def encode_sections(pipeline, jobs: list[EncodeJob], engine=None) -> list[tuple[str, np.ndarray]]:
    """(name, section bytes) of every job, in order. engine: the library (default) or
    _ReferenceEngine()."""
    from .backends import note_used

    rope, had, lattice, entropy = value_stages(pipeline)
    engine = engine if engine is not None else _CudaEngine()
    sections, sink_maps, trig, trig_at = [], [], [], {}
    n_sink_map = n_trig = 0
    for job in jobs:
        info = job.info
        n, h, d = info.n_cells, info.n_heads, info.head_dim
        _, sink = lattice.stream_shapes(info)
        sec = {"n_cells": n, "n_heads": h, "head_dim": d, "rows": job.rows, "rows_f16": int(job.rows_f16),
               "transposed": int(job.transposed), "rope": 0, "n_rot": 0, "trig0": 0,
               "hadamard": int(had is not None and not had.passes_through(info)), "sink_map0": -1,
               "center": int(lattice.center), "n_sink": int(sink.sum()) if lattice.sinks else 0}
        if lattice.sinks:
            rows = np.full(n, -1, np.int32)
            rows[sink] = np.arange(int(sink.sum()), dtype=np.int32)
            sec["sink_map0"] = n_sink_map
            sink_maps.append(rows)
            n_sink_map += n
        if rope is not None and not rope.passes_through(info):
            key = (np.asarray(info.positions).tobytes(), bool(info.sliding))
            if key not in trig_at:
                cos, sin = rope._trig(np.asarray(info.positions), info.sliding, -1.0)
                trig_at[key] = n_trig
                trig.append((np.ascontiguousarray(cos, np.float64).reshape(-1), np.ascontiguousarray(sin, np.float64).reshape(-1)))
                n_trig += cos.size
            sec.update(rope=1 if rope.mode == "norm" else 2, n_rot=rope.n_rot, trig0=trig_at[key])
        sections.append(sec)
    sink_map = np.concatenate(sink_maps) if sink_maps else np.zeros(0, np.int32)
    cos = np.concatenate([c for c, _ in trig]) if trig else np.zeros(0)
    sin = np.concatenate([s for _, s in trig]) if trig else np.zeros(0)
    try:
        sinks, means, sumsq = engine.begin(sections, sink_map, cos, sin)
        # the scale symbols and steps as Lattice.encode makes them (head scope, RMS, log scale)
        steps, scales = [], []
        for sec, job, ss in zip(sections, jobs, sumsq):
            with np.errstate(divide="ignore"):
                stat = np.sqrt(ss / (sec["n_cells"] * sec["head_dim"])).reshape(-1, 1)
                q = np.round(LOG_STEPS * np.log2(stat))
            scale = np.where(stat > 0, np.clip(q, -32767, 32767), LOG_ZERO).astype(np.int16)
            scales.append(scale)
            steps.append(lattice.group_steps(scale, job.info).reshape(-1))
        minmax = engine.quantize(np.concatenate(steps) if steps else np.zeros(0))
        # each point stream: empty, rANS (alphabet below 4096) or, for rare wide ones, the host
        n_streams = 3 * len(jobs)
        counts = [_point_count(sections[k // 3], k % 3) for k in range(n_streams)]
        lo = np.array([minmax[k][0] for k in range(n_streams)], np.int64)
        size = np.array([minmax[k][1] - minmax[k][0] + 1 for k in range(n_streams)], np.int64)
        coded = np.array([counts[k] > 0 and size[k] <= MAX_ALPHABET for k in range(n_streams)])
        hist_offset = np.where(coded, np.cumsum(np.where(coded, size, 0)) - size, -1).astype(np.int64)
        hist = engine.histogram(hist_offset, lo, np.where(coded, size, 0), int(np.where(coded, size, 0).sum()))
        freqs = [normalized_freqs(hist[hist_offset[k] : hist_offset[k] + size[k]]) if coded[k] else None
                 for k in range(n_streams)]
        chunk = np.array([counts[k] if entropy.plain_rans else entropy.chunk_of(counts[k]) for k in range(n_streams)], np.int64)
        lanes = 1 if entropy.plain_rans else entropy.lanes
        lengths, body = engine.rans(hist_offset, np.concatenate([f for f in freqs if f is not None] or [np.zeros(0, np.int64)]),
                                    lo, lanes, chunk, [n_lane_tasks(counts[k], lanes, int(chunk[k])) if coded[k] else 0
                                                       for k in range(n_streams)])
        out = []
        task = at = 0
        for j, (job, sec) in enumerate(zip(jobs, sections)):
            n, h, d = sec["n_cells"], sec["n_heads"], sec["head_dim"]
            g = h * d // 8
            parts = []
            if lattice.sinks:
                parts.append(entropy.stream_record("sink", sinks[j].reshape(sec["n_sink"], h, d)))
            if lattice.center:
                parts.append(entropy.stream_record("mean", means[j].reshape(h, d)))
            parts.append(entropy.stream_record("scale", scales[j]))
            for part, (name, dtype) in enumerate(POINT_STREAMS):
                k = 3 * j + part
                shape = (n, g, 7) if name == "coord" else (n, g)
                if not counts[k]:
                    parts.append(stream_record(name, dtype, shape, METHOD_EMPTY, b""))
                elif coded[k]:
                    n_tasks = n_lane_tasks(counts[k], lanes, int(chunk[k]))
                    lens = lengths[task : task + n_tasks]
                    data = body[at : at + int(lens.sum())]
                    task += n_tasks
                    at += int(lens.sum())
                    table = rans_table(int(lo[k]), freqs[k])
                    if entropy.plain_rans:
                        method, payload = METHOD_RANS, table + data
                    else:
                        method, payload = METHOD_RANS_LANES, table + lanes_table(lanes, int(chunk[k]), lens) + data
                    if entropy.small_streams and counts[k] <= entropy.small_streams:  # or zstd, as the CPU writer
                        method, payload = entropy.smaller(engine.symbols(k, counts[k]).astype(dtype), method, payload)
                    parts.append(stream_record(name, dtype, shape, method, payload))
                else:  # a wide alphabet: the entropy stage's own choice (zstd), on the host
                    values = engine.symbols(k, counts[k]).astype(dtype).reshape(shape)
                    parts.append(entropy.stream_record(name, values))
            out.append((job.name, np.frombuffer(bytes([len(parts)]) + b"".join(parts), np.uint8)))
    finally:
        engine.close()
    note_used("encode_sections", engine.name)
    return out


def _point_count(sec: dict, part: int) -> int:
    groups = sec["n_cells"] * sec["n_heads"] * sec["head_dim"] // 8
    return 7 * groups if part == 1 else groups


class _CudaEngine:
    """The library's nxkv_cuda_encode_* steps."""

    name = "cuda"

    def __init__(self):
        from .backends import cuda

        self.cuda = cuda
        self.ffi, self.lib = cuda.load()
        self.handle = None
        self.keep: list = []
        self.sections: list[dict] = []

    def _err(self):
        return self.ffi.new("char[]", 512)

    def _check(self, r, err, what: str) -> None:
        if r == self.lib.NXKV_CUDA_ERR_ARG and what == "quantize":
            raise ValueError("lattice_quantize: values too large for their steps (points beyond int32)")
        if r == self.lib.NXKV_CUDA_ERR_ARG:
            raise ConfigError(f"GPU encode ({what}): arguments out of range")
        if r != self.lib.NXKV_CUDA_OK:
            raise self.cuda.CudaError(f"GPU encode ({what}): {self.ffi.string(err).decode(errors='replace')}")

    def _in(self, kind, a):
        if not a.size:
            return self.ffi.NULL
        p = self.ffi.from_buffer(kind, a, require_writable=False)
        self.keep.append(p)
        return p

    def begin(self, sections, sink_map, cos, sin):
        ffi = self.ffi
        self.sections = sections
        arr = ffi.new("nxkv_cuda_encode_section[]", max(len(sections), 1))
        sinks, means, sumsq = [], [], []
        for i, sec in enumerate(sections):
            s = arr[i]
            for key in ("n_cells", "n_heads", "head_dim", "rows_f16", "transposed", "rope", "n_rot", "trig0", "hadamard",
                        "sink_map0", "center"):
                setattr(s, key, sec[key])
            rows = np.ascontiguousarray(sec["rows"])
            s.rows = ffi.cast("void *", self._in("uint8_t[]", rows.reshape(-1).view(np.uint8)))
            hd = sec["n_heads"] * sec["head_dim"]
            sinks.append(np.empty(sec["n_sink"] * hd, np.uint16))
            means.append(np.empty(hd, np.uint16))
            sumsq.append(np.empty(sec["n_heads"], np.float64))
            s.sinks_out = ffi.cast("uint16_t *", ffi.from_buffer("uint16_t[]", sinks[-1])) if sinks[-1].size else ffi.NULL
            s.mean_out = ffi.cast("uint16_t *", ffi.from_buffer("uint16_t[]", means[-1]))
            s.sumsq_out = ffi.cast("double *", ffi.from_buffer("double[]", sumsq[-1]))
        self.keep += [arr, sinks, means, sumsq]
        handle = ffi.new("nxkv_cuda_encoder **")
        err = self._err()
        r = self.lib.nxkv_cuda_encode_begin(arr, len(sections), self._in("int32_t[]", np.ascontiguousarray(sink_map, np.int32)),
                                            sink_map.size, self._in("double[]", cos), self._in("double[]", sin), cos.size, handle,
                                            err, 512)
        self._check(r, err, "begin")
        self.handle = handle[0]
        return sinks, means, sumsq

    def quantize(self, steps):
        steps = np.ascontiguousarray(steps, np.float64)
        minmax = np.empty(6 * len(self.sections), np.int64)
        err = self._err()
        r = self.lib.nxkv_cuda_encode_quantize(self.handle, self._in("double[]", steps), steps.size,
                                               self.ffi.from_buffer("int64_t[]", minmax), err, 512)
        self._check(r, err, "quantize")
        return minmax.reshape(-1, 2)

    def histogram(self, hist_offset, lo, size, n_hist):
        hist = np.zeros(n_hist, np.int64)
        err = self._err()
        r = self.lib.nxkv_cuda_encode_histogram(self.handle, self._in("int64_t[]", hist_offset), self._in("int64_t[]", lo),
                                                self._in("int64_t[]", np.ascontiguousarray(size, np.int64)),
                                                self.ffi.from_buffer("int64_t[]", hist) if n_hist else self.ffi.NULL, n_hist,
                                                err, 512)
        self._check(r, err, "histogram")
        return hist

    def rans(self, freq_offset, freqs, lo, lanes, chunk, n_tasks):
        total_tasks = int(sum(n_tasks))
        lengths = np.empty(total_tasks, np.int64)
        capacity = int(sum(2 * _point_count(self.sections[k // 3], k % 3) + 8 * max(n_tasks[k], 1)
                           for k in range(len(freq_offset)) if freq_offset[k] >= 0))
        body = np.empty(max(capacity, 1), np.uint8)
        size = self.ffi.new("int64_t *", body.size)
        err = self._err()
        r = self.lib.nxkv_cuda_encode_rans(self.handle, self._in("int64_t[]", np.ascontiguousarray(freq_offset, np.int64)),
                                           self._in("int64_t[]", np.ascontiguousarray(freqs, np.int64)), freqs.size,
                                           self._in("int64_t[]", lo), lanes, self._in("int64_t[]", chunk),
                                           self.ffi.from_buffer("int64_t[]", lengths) if total_tasks else self.ffi.NULL,
                                           total_tasks, self.ffi.from_buffer("uint8_t[]", body), size, err, 512)
        self._check(r, err, "rans")
        return lengths, body[: size[0]].tobytes()

    def symbols(self, stream, n):
        out = np.empty(n, np.int32)
        err = self._err()
        r = self.lib.nxkv_cuda_encode_symbols(self.handle, stream, self.ffi.from_buffer("int32_t[]", out), n, err, 512)
        self._check(r, err, "symbols")
        return out

    def close(self):
        if self.handle is not None:
            self.lib.nxkv_cuda_encode_free(self.handle)
            self.handle = None
        self.keep.clear()


class _ReferenceEngine:
    """The numpy reference of the library's steps: the same operations in the same order (the
    sums of squares in the same fixed tree), so the same bytes."""

    name = "numpy (reference of the GPU encoder)"

    def begin(self, sections, sink_map, cos, sin):
        from .backends import reference as ref

        self.sections = sections
        self.x, self.mean, sinks, means, sumsq = [], [], [], [], []
        for sec in sections:
            n, h, d = sec["n_cells"], sec["n_heads"], sec["head_dim"]
            t = np.float16 if sec["rows_f16"] else np.float32
            vals = np.ascontiguousarray(sec["rows"]).reshape(-1).view(t).astype(np.float32)
            x = (vals.reshape(h * d, n).T if sec["transposed"] else vals.reshape(n, h * d)).reshape(n, h, d)
            if sec["rope"]:
                half = sec["n_rot"] // 2
                c = cos[sec["trig0"] : sec["trig0"] + n * half].reshape(n, half)
                s = sin[sec["trig0"] : sec["trig0"] + n * half].reshape(n, half)
                x = ref.rope_rotate(x, c, s, sec["n_rot"], sec["rope"] == 2)
            if sec["hadamard"]:
                x = np.array(x, np.float32)
                start = 0
                for block in power_of_two_blocks(d):
                    x[..., start : start + block] = ref.hadamard_blocks(np.ascontiguousarray(x[..., start : start + block]), block)
                    start += block
            x = np.ascontiguousarray(x, np.float32)
            sink = (sink_map[sec["sink_map0"] : sec["sink_map0"] + n] >= 0) if sec["sink_map0"] >= 0 else np.zeros(n, bool)
            sinks.append(ref.f32_to_f16(x[sink]).reshape(-1))
            xd = x.astype(np.float64).reshape(n, h * d)
            if sec["center"]:
                rest = xd[~sink] if (~sink).any() else xd
                m16 = ref.f64_to_f16(rest.mean(axis=0))  # numpy's mean: rows added in order
                means.append(m16)
                mean = m16.view(np.float16).astype(np.float64)
                xd = xd - mean
            else:
                means.append(np.zeros(h * d, np.uint16))
                mean = np.zeros(h * d)
            self.x.append(x)
            self.mean.append(mean)
            sq = (xd.reshape(n, h, d) ** 2).transpose(1, 0, 2).reshape(h, n * d)
            sumsq.append(np.array([_tree_sum(row) for row in sq]))
        return sinks, means, sumsq

    def quantize(self, steps):
        from .backends import reference as ref

        self.symbols_ = []
        minmax = []
        at = 0
        for sec, x, mean in zip(self.sections, self.x, self.mean):
            n, h, d = sec["n_cells"], sec["n_heads"], sec["head_dim"]
            xd = x.astype(np.float64).reshape(n, h * d) - (mean if sec["center"] else 0.0)
            step = np.repeat(steps[at : at + h], d // 8)
            at += h
            coset, coord, last = ref.lattice_quantize(xd.reshape(-1, 8), np.tile(step, n))
            streams = [coset.astype(np.int32), coord.astype(np.int32).reshape(-1), last.astype(np.int32)]
            self.symbols_ += streams
            minmax += [(int(s.min()), int(s.max())) for s in streams]
        return np.array(minmax, np.int64)

    def histogram(self, hist_offset, lo, size, n_hist):
        hist = np.zeros(n_hist, np.int64)
        for k, off in enumerate(hist_offset):
            if off >= 0:
                hist[off : off + size[k]] = np.bincount(self.symbols_[k] - lo[k], minlength=size[k])
        return hist

    def rans(self, freq_offset, freqs, lo, lanes, chunk, n_tasks):
        from .backends import reference as ref

        lengths, bodies = [], []
        coded = [k for k, off in enumerate(freq_offset) if off >= 0]
        for i, k in enumerate(coded):  # a stream's table runs to the next one's
            end = freq_offset[coded[i + 1]] if i + 1 < len(coded) else freqs.size
            f = freqs[freq_offset[k] : end]
            lens, body = ref.rans_encode_lanes(self.symbols_[k].astype(np.int64) - lo[k], f, lanes, int(chunk[k]))
            lengths.append(lens)
            bodies.append(body)
        return (np.concatenate(lengths) if lengths else np.zeros(0, np.int64)), b"".join(bodies)

    def symbols(self, stream, n):
        return self.symbols_[stream]

    def close(self):
        pass


def _tree_sum(values: np.ndarray) -> float:
    """The GPU's sum of squares: 256 threads add strided elements in order, then a tree."""
    pad = (-values.size) % 256
    part = np.concatenate([values, np.zeros(pad)]).reshape(-1, 256).sum(axis=0)  # rows in order (numpy's axis 0)
    w = 128
    while w:
        part[:w] = part[:w] + part[w : 2 * w]
        w //= 2
    return float(part[0])
