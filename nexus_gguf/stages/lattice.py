"""E8 lattice vector quantization of 8-value groups, with scales taken from the data itself.

Each channel's mean over the cells is subtracted first (`center`). Each block of `scale_block`
values of a head vector (0: the whole vector), or each head as a whole (`scale_scope="head"`),
gets one scale, its RMS or its largest magnitude, stored as a log2 step in 1/8 octaves (or, as the seed did, as
f16). The values divided by step = scale * 2^(2.047 - bits) (RMS; 2.047 = h(N(0,1)) in bits,
so `bits` is about what an ideal entropy coder spends per value on Gaussian data) or by
scale / 2^(bits - 1) (max: the largest value lands on 2^(bits-1)) are rounded to the nearest
point of E8 = D8 ∪ (D8 + ½).

A point is stored as its coset (integer or half-integer) and eight integers z = p - coset/2.
Their sum is always even, so the last one is stored halved and its parity implied: one bit per
group that a coordinate-by-coordinate coder would otherwise spend."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from ..backends import kernel
from ..errors import ConfigError, FormatError
from .base import Stage, TensorInfo

GAUSS_BITS = 0.5 * np.log2(2 * np.pi * np.e)  # differential entropy of N(0, 1) in bits
LOG_STEPS = 8  # log-scale resolution: steps per octave
LOG_ZERO = -32768  # the log scale of an all-zero block
BUCKETS_PER_OCTAVE = 2  # importance-aware steps come in half octaves
N_CLASSES = 8  # component classes: the octave of RMS / step, from below 2^-3 (0) to 2^4 and above (7)
CLASS_OFFSET = 4
MAX_STREAMS = 255  # entropy.py's u8 stream count
MAX_BASIS_DIM = 512  # values of one coded vector, a head group (native/core/transform.h NXKV_MAX_HEAD_DIM)
# rate-distortion quantization (the rdo option): the candidates are the nearest points of the
# values shrunk by these factors; the rate model counts doubled coordinates up to +-RDO_SPAN
# (beyond it, one pooled cost) per component and step bucket, re-counted RDO_PASSES times
RDO_SCALES = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
RDO_SPAN = 64
RDO_PASSES = 2
CELL_BLOCK = 1024  # cells a step works on at a time where it would otherwise make a whole-section temporary


class Lattice(Stage):
    stage_id = "lattice"
    lossless = False
    kind = "quantizer"
    PARAMS = {
        "k_bits": (float, 3.0),
        "v_bits": (float, 3.0),
        "sinks": (int, 4),  # cells at positions below this are stored as f16 (attention sinks)
        "center": (bool, True),  # subtract each head channel's mean over the cells first
        "scale_scope": (str, "vector"),  # vector: scales per head vector (and block) | head: one per head
        "scale_block": (int, 0),  # values per scale within a head vector; 0: the whole vector
        "scale_stat": (str, "rms"),  # rms | max
        "scale_format": (str, "log"),  # log (int16 log2 in 1/8 octaves) | f16
        # importance-aware steps: a cell's step grows as (its attention / the median)^-token_steps,
        # in half octaves (the `bucket` stream), at most step_octaves coarser; 0: one step for all
        "token_steps": (float, 0.0),
        "step_octaves": (float, 4.0),
        # states of fewer cells (a stream) keep one step for all: the attention capture the
        # steps need costs more than they save on short prompts (decided at save time only:
        # a reader finds the bucket stream or not)
        "step_min_cells": (int, 0),
        # pca: each head's values (centred, sinks aside) coded on the principal axes of that
        # section's own head vectors, the basis stored in the section (`basis`, int16 entries of
        # basis_bits bits: x = y @ basis / 2^(basis_bits-1)); sections of fewer than
        # pca_min_cells cells (where the basis would cost more than it saves) are coded as they are
        "transform": (str, "none"),  # none | pca
        "basis_bits": (int, 6),
        "pca_min_cells": (int, 1024),
        # KV heads coded as one vector, concatenated: one step, one basis (with pca) and one set of
        # component classes for the group; the largest divisor k of the head count up to this
        # (0: all heads) with k * head size at most MAX_BASIS_DIM. The heads of a layer are
        # correlated and one step for all measures better than one per head (SmolLM2, 4096
        # tokens, all 3 heads: 11-16% smaller at equal KLD; README)
        "head_group": (int, 1),
        # one entropy model per component class (the octave of the component's RMS over the
        # step, `class` [h, d]) instead of one per stream: the point streams split by column; in
        # sections of at least class_min_cells cells (0 as files written before the option:
        # all; the presets say 512: the tables cost more than they save below it)
        "classes": (bool, False),
        "class_min_cells": (int, 0),
        # queries (with pca): K's channels scaled by the root mean square of the queries that read
        # them (summed over each RoPE pair: q.k's error is what attention pays for) before the
        # basis is fitted, the inverse scales stored (`channel_scale`, f16 [h, d])
        "k_weights": (str, "none"),
        # bits added to K's where its channels are weighted (k_weights, sections with a basis):
        # the weights move the error to channels the queries barely read, and a finer step
        # there buys more than it costs (SmolLM2, 4096 tokens: +0.2 bits, 7-8% smaller at
        # equal KLD than no weights on four texts; README); shorter sections keep k_bits
        "k_weights_bits": (float, 0.0),
        # rate-distortion quantization: each group of 8 takes, of the nearest points of its values
        # shrunk by RDO_SCALES, the one of least squared error + rdo * its bits (error in squared
        # steps, bits from the section's own symbol counts: a first pass of nearest points, then
        # RDO_PASSES re-counts); 0: the nearest point. Only the writer uses it: the stored points
        # decode as any others. Points nearer zero cost fewer bits where the symbol counts say so
        # (SmolLM2, 4096 tokens, high at 3.5 bits: 0.05 made files 5-6% smaller, the KLD within
        # its noise; at equal KLD it beat fewer bits on four texts; README)
        "rdo": (float, 0.0),
        # (with pca) components on the principal axes whose mean square over the section's cells
        # (sinks aside) is below basis_prune steps^2 are left out: set to zero before quantizing,
        # and their basis rows, with those of every component whose points all came out zero,
        # stored as zeros. Readers multiply by the basis as stored, so nothing decodes
        # differently; a zero row costs a few bits where a used one costs ~5 an entry, and the
        # weakest components (mostly zero points, each nonzero one costly) were the basis rows
        # that bought least. Only the writer uses it. 0: every row stored, components whose
        # points are all zero included (the files before the option). SmolLM2, 4096 tokens, 0.1:
        # high 2% and balanced 6-8% smaller, the KLD within its noise, on four texts (README)
        "basis_prune": (float, 0.0),
    }
    # more bits for the first and last layers measured no gain (README); format 1 files of 0.1
    # wrote edge_layers=0 with the model's n_layer
    RETIRED = {"edge_layers": 0, "edge_bits": None, "n_layer": None}
    # encoding only, not an option: bits added to each layer's K and V (bit_profile.BitProfile,
    # from bind); they move the stored log scale, so decoding needs nothing of it
    profile = None

    @property
    def takes_profile(self) -> bool:
        """Whether a bit profile can move this stage's steps: log scales hold any step in 1/8 bits."""
        return self.scale_format == "log"

    def bind(self, model) -> "Lattice":
        profile = getattr(model, "bit_profile", None)
        if profile is None or not self.takes_profile:
            return self
        bound = type(self).from_config(self.get_config())
        bound.profile = profile
        bound.note = f"steps per layer from bit profile {profile.name} ({profile.model})"
        return bound

    def extra_bits(self, info: TensorInfo) -> float:
        """Bits this section gets beyond bits(info), from the bound profile (0 without one)."""
        return 0.0 if self.profile is None else self.profile.extra_bits(info.kind, info.model_layer)

    def validate(self) -> None:
        if self.scale_stat not in ("rms", "max") or self.scale_format not in ("log", "f16"):
            raise ConfigError("lattice: scale_stat is rms or max, scale_format log or f16")
        if self.scale_scope not in ("vector", "head"):
            raise ConfigError("lattice: scale_scope is vector or head")
        if self.scale_block < 0 or (self.scale_block and self.scale_block % 8):
            raise ConfigError("lattice: scale_block must be 0 or a multiple of 8")
        for b in (self.k_bits, self.v_bits, self.k_bits + self.k_weights_bits):
            if not 0.5 <= b <= 12:
                raise ConfigError(f"lattice: bits must lie in 0.5 .. 12, got {b}")
        if not (0.0 <= self.token_steps <= 4.0 and 0.0 <= self.step_octaves <= 16.0 and self.step_min_cells >= 0):
            raise ConfigError("lattice: token_steps in 0 .. 4, step_octaves in 0 .. 16, step_min_cells at least 0")
        if not 0.0 <= self.rdo <= 10.0:
            raise ConfigError(f"lattice: rdo must lie in 0 .. 10, got {self.rdo}")
        if not 0.0 <= self.basis_prune <= 16.0:
            raise ConfigError(f"lattice: basis_prune must lie in 0 .. 16 (steps^2), got {self.basis_prune}")
        if (self.transform not in ("none", "pca") or not 2 <= self.basis_bits <= 10 or self.pca_min_cells < 1
                or self.class_min_cells < 0 or self.head_group < 0):
            raise ConfigError("lattice: transform is none or pca, basis_bits in 2 .. 10, pca_min_cells at least 1, "
                              "class_min_cells and head_group at least 0")
        if self.k_weights not in ("none", "queries") or (self.k_weights == "queries" and self.transform != "pca"):
            raise ConfigError("lattice: k_weights is none or queries (with transform pca)")
        if self.head_group != 1 and self.scale_scope != "head":
            raise ConfigError("lattice: head groups need one step per head (scale_scope head)")
        if (self.classes or self.transform != "none") and self.scale_scope != "head":
            raise ConfigError("lattice: the PCA transform and component classes need one step per head (scale_scope head)")
        if self.classes and self.token_steps and (self.max_bucket + 1) * 3 * N_CLASSES + 8 > MAX_STREAMS:
            raise ConfigError(f"lattice: component classes with step_octaves {self.step_octaves} would need more than "
                              f"{MAX_STREAMS} streams a section; at most {(MAX_STREAMS - 8) // (3 * N_CLASSES) // BUCKETS_PER_OCTAVE - 1} octaves")

    @property
    def uses_importance(self) -> bool:
        return self.token_steps > 0

    @property
    def uses_queries(self) -> bool:
        return self.k_weights == "queries"

    def queries_used_at(self, n_cells: int) -> bool:
        # only K sections on a basis are weighted, and those start at pca_min_cells cells
        return self.uses_queries and n_cells >= self.pca_min_cells

    def importance_used_at(self, n_cells: int) -> bool:
        return self.uses_importance and n_cells >= self.step_min_cells

    @property
    def max_bucket(self) -> int:
        return int(round(BUCKETS_PER_OCTAVE * self.step_octaves))

    def _buckets(self, info: TensorInfo, sink: np.ndarray, n: int):
        """uint8 [n] step buckets from the cells' importance, or None (one step for all)."""
        if not self.importance_used_at(n) or info.importance is None:
            return None
        imp = np.asarray(info.importance, np.float64).reshape(n)
        rest = imp[~sink] if (~sink).any() else imp
        ref = np.median(rest)  # the mean is the window's and the sinks' (most of the attention)
        with np.errstate(divide="ignore", invalid="ignore"):
            octaves = -self.token_steps * np.log2(imp / ref if ref > 0 else np.ones(n))
        b = np.clip(np.round(BUCKETS_PER_OCTAVE * np.nan_to_num(octaves, nan=0.0, posinf=99.0)), 0, self.max_bucket)
        b[sink] = 0  # stored as f16 anyway
        return b.astype(np.uint8)

    def bits(self, info: TensorInfo) -> float:
        """Bits of the section's values (info: the coding view)."""
        if info.kind != "k":
            return self.v_bits
        if self.k_weights_bits and self._weighted(info, self._sink_rows(info, info.n_cells)):
            return self.k_bits + self.k_weights_bits
        return self.k_bits

    def _block(self, head_dim: int, name: str) -> int:
        if head_dim % 8:
            raise ConfigError(f"{name}: head size {head_dim} is not a multiple of 8 (E8 groups)")
        block = self.scale_block or head_dim
        if head_dim % block:
            raise ConfigError(f"{name}: scale_block {block} does not divide the head size {head_dim}")
        return block

    def _steps(self, scale_symbols: np.ndarray, info: TensorInfo) -> np.ndarray:
        """float64 quantizer step per block from the stored scale symbols."""
        if self.scale_format == "log":
            q = scale_symbols.astype(np.float64)
            scale = np.where(scale_symbols == LOG_ZERO, 0.0, np.exp2(q / LOG_STEPS))
        else:
            scale = scale_symbols.astype(np.uint16).view(np.float16).astype(np.float64)
        b = self.bits(info)
        return scale * (2.0 ** (GAUSS_BITS - b) if self.scale_stat == "rms" else 2.0 ** (1.0 - b))

    def _scale_shape(self, n: int, h: int, d: int, block: int) -> tuple[int, ...]:
        return (h, 1) if self.scale_scope == "head" else (n, h, d // block)

    def heads_per_vector(self, info: TensorInfo) -> int:
        """How many of the section's KV heads are coded as one vector (head_group)."""
        h, d = info.n_heads, info.head_dim
        limit = h if self.head_group == 0 else min(self.head_group, h)
        return max(k for k in range(1, max(limit, 1) + 1) if h % k == 0 and (k == 1 or k * d <= MAX_BASIS_DIM))

    def coding_view(self, info: TensorInfo) -> TensorInfo:
        """The section as the lattice codes it: each group of heads (head_group) as one wider head
        (the streams' shapes follow it; the values' memory order is the same)."""
        k = self.heads_per_vector(info)
        if k == 1:
            return info
        energy = info.query_energy
        return replace(info, n_heads=info.n_heads // k, head_dim=info.head_dim * k,
                       query_energy=None if energy is None else np.asarray(energy).reshape(info.n_heads // k, -1))

    def encode(self, x: np.ndarray, info: TensorInfo) -> dict[str, np.ndarray]:
        info = self.coding_view(info)
        n, h, d = info.n_cells, info.n_heads, info.head_dim
        x = x.reshape(n, h, d)
        block = self._block(d, info.name)
        # this copy is the section's one working array: the steps below change it in place and
        # make no other array of its size (a save encodes a layer per core: what each holds at
        # its peak is most of what a save adds to the state)
        x = np.array(x, np.float64)
        out = {}
        sink = self._sink_rows(info, n)
        some = bool((~sink).any())  # cells that are not sinks (else statistics over all)
        if self.sinks:
            # the first tokens draw most of the attention (sinks) and lie far from the others:
            # quantized like the rest they cost more KLD than all other tokens together
            out["sink"] = x[sink].astype(np.float16).view(np.uint16)
        if self.center:
            # K without RoPE shares a large per-channel offset across tokens (most of its energy
            # in SmolLM2); stored once, it leaves a much smaller residual to quantize
            mean = (_rows_except(x, sink) if some else x).mean(axis=0).astype(np.float16)
            out["mean"] = mean.view(np.uint16)
            x -= mean.astype(np.float64)
        if self._weighted(info, sink):
            scale = channel_scales(info.query_energy, h, d)
            out["channel_scale"] = scale.view(np.uint16)
            x /= scale.astype(np.float64)
        if self._pca(info, sink):
            out["basis"] = pca_basis(_rows_except(x, sink), self.basis_bits)
            to_basis(x, out["basis"], self.basis_bits, out=x)
        xb = x.reshape(n, h, d // block, block)
        if self.scale_scope == "head":
            stat = np.sqrt(_head_mean_square(x)) if self.scale_stat == "rms" else np.abs(xb).max(axis=(0, 2, 3))
            stat = stat.reshape(h, 1)
        else:
            stat = np.empty(xb.shape[:-1])
            for start in range(0, n, CELL_BLOCK):  # no whole-section temporaries
                part = xb[start : start + CELL_BLOCK]
                stat[start : start + CELL_BLOCK] = np.sqrt((part**2).mean(axis=-1)) if self.scale_stat == "rms" else np.abs(part).max(axis=-1)
        if self.scale_format == "log":
            with np.errstate(divide="ignore"):
                # a profile's extra bits lower the stored scale, so the step the decoder derives
                # from it (_steps) is 2^-extra as large: the profile is in the file's scales
                q = np.round(LOG_STEPS * np.log2(stat)) - round(LOG_STEPS * self.extra_bits(info))
            scale_symbols = np.where(stat > 0, np.clip(q, -32767, 32767), LOG_ZERO).astype(np.int16)
        else:
            scale_symbols = stat.astype(np.float16).view(np.uint16)
        buckets = self._buckets(info, sink, n)
        if buckets is not None:
            out["bucket"] = buckets
        step = self.cell_steps(scale_symbols, info, buckets)
        group_step = np.repeat(step.reshape(n, -1), block // 8, axis=1)  # [n, g]: each 8-value group's step
        g = h * d // 8
        x8 = xb.reshape(-1, 8)
        pruned = None
        if self.basis_prune > 0 and "basis" in out:
            pruned = weak_components(x, step[:, :, 0], sink, self.basis_prune)
            x[:, pruned] = 0.0  # x, xb and x8 are one array
        coset, coord, last = self._points(x8, group_step, buckets, n, g)
        if pruned is not None:
            # rows the decoder multiplies only by zero points, or by the points of components
            # left out (whatever the lattice made of their zeros, next to the group's others)
            unused = pruned | unused_components((coset, coord, last), n, h, d, sink)
            out["basis"][unused] = 0
        if self.uses_classes(info):
            # one stream per component class (below): after PCA the first components spread
            # over many steps and the last are nearly all zero. x is not needed after this:
            # squared in place
            np.square(x, out=x)
            rms = np.sqrt((_rows_except(x, sink) if some else x).mean(axis=0))
            out["class"] = component_classes(rms, self._steps(scale_symbols, info))
        del x, xb, x8
        points = {"coset": coset.reshape(n, g), "coord": coord.reshape(n, g, 7), "coord_last": last.reshape(n, g)}
        del coset, coord, last  # each split below holds its own copy of the points: one at a time
        if buckets is not None:
            # one stream (so one rANS table) per step bucket: coarse cells' symbols are mostly
            # zero, fine cells' spread out; mixed in one table each would pay for the other
            points = _split_by_bucket(points, buckets)
        if "class" in out:
            points = _split_by_class(points, column_classes(out["class"]))
        return {**out, "scale": scale_symbols, **points}

    def _points(self, x8: np.ndarray, group_step: np.ndarray, buckets: Optional[np.ndarray], n: int, g: int) -> tuple:
        """(coset, coord, coord_last) of the groups x8 [n g, 8]: the nearest points, or with the
        rdo option those of rate-distortion quantization, rates from the points' own counts per
        component and step bucket (what the class and bucket streams' tables pay, roughly),
        re-counted after each pass. Only one pass's points are held at a time."""
        points = kernel("lattice_quantize")(x8, group_step)
        if self.rdo <= 0:
            return points
        bucket = np.zeros(n, np.int64) if buckets is None else buckets.astype(np.int64)
        rows = ((np.repeat(bucket, g) * g + np.tile(np.arange(g, dtype=np.int64), n)) * 8)  # each group's 8 cost rows
        n_rows = (int(bucket.max(initial=0)) + 1) * g * 8
        for _ in range(RDO_PASSES):
            costs = rate_costs(points, rows, n_rows)
            del points  # the counts are all the next pass needs of them
            points = kernel("lattice_quantize_rdo")(x8, group_step, rows, costs, RDO_SCALES, self.rdo)
            del costs
        return points

    def stream_shapes(self, info: TensorInfo) -> tuple[dict[str, tuple[int, ...]], np.ndarray]:
        """(stream name -> the shape decode needs, bool [n_cells]: the sink rows), bucket
        streams aside (they are joined first); info: the coding view."""
        n, h, d = info.n_cells, info.n_heads, info.head_dim
        block = self._block(d, info.name)
        g = h * d // 8
        want = {"scale": self._scale_shape(n, h, d, block), "coset": (n, g), "coord": (n, g, 7), "coord_last": (n, g)}
        if self.center:
            want["mean"] = (h, d)
        sink = self._sink_rows(info, n)
        if self.sinks:
            want["sink"] = (int(sink.sum()), h, d)
        if self._pca(info, sink):
            want["basis"] = (h, d, d)
        if self._weighted(info, sink):
            want["channel_scale"] = (h, d)
        return want, sink

    def uses_classes(self, info: TensorInfo) -> bool:
        """Whether this section's point streams are split by component class (decided from
        what decode knows)."""
        return self.classes and info.n_cells >= self.class_min_cells

    def _pca(self, info: TensorInfo, sink: np.ndarray) -> bool:
        """Whether this section is coded on its principal axes (decided from what decode knows)."""
        return self.transform == "pca" and int((~sink).sum()) >= self.pca_min_cells

    def _weighted(self, info: TensorInfo, sink: np.ndarray) -> bool:
        """Whether this section's channels are scaled by the queries first (K sections on their
        principal axes; decided from what decode knows)."""
        return self.k_weights == "queries" and info.kind == "k" and self._pca(info, sink)

    def channel_scale(self, symbols: dict, info: TensorInfo, sink: np.ndarray) -> np.ndarray:
        """float64 [h * d]: the stored channel scales (empty where the section has none),
        checked: positive and finite."""
        if not self._weighted(info, sink):
            return np.zeros(0)
        scale = symbols["channel_scale"].astype(np.uint16).view(np.float16).astype(np.float64).reshape(-1)
        if scale.size and not (np.isfinite(scale).all() and (scale > 0).all()):
            raise FormatError(f"{info.name}: channel scales must be positive and finite")
        return scale

    def group_steps(self, scale_symbols: np.ndarray, info: TensorInfo) -> np.ndarray:
        """float64 [n, h, blocks] (vector scope) or [h, 1] (head scope): the quantizer step of
        each scale block, buckets aside."""
        return self._steps(scale_symbols, info)

    def check_buckets(self, buckets: np.ndarray, info: TensorInfo) -> None:
        """FormatError unless these are step buckets of the section's cells (info: the coding view)."""
        n = info.n_cells
        if buckets.shape != (n,) or (buckets.size and int(buckets.max()) > self.max_bucket):
            raise FormatError(f"{info.name}: step buckets not of shape {(n,)} or above {self.max_bucket}")

    def cell_steps(self, scale_symbols: np.ndarray, info: TensorInfo, buckets: Optional[np.ndarray]) -> np.ndarray:
        """float64 [n, h, blocks]: every cell's step per scale block, its step bucket's factor
        included (buckets: checked, or None)."""
        step = self._broadcast(self._steps(scale_symbols, info), info.n_cells)
        if buckets is not None:
            step = step * np.exp2(buckets.astype(np.float64) / BUCKETS_PER_OCTAVE)[:, None, None]
        return step

    def decode(self, symbols: dict[str, np.ndarray], info: TensorInfo) -> np.ndarray:
        shape = (info.n_cells, info.n_heads, info.head_dim)
        return self._decode(symbols, self.coding_view(info)).reshape(shape)

    def _decode(self, symbols: dict[str, np.ndarray], info: TensorInfo) -> np.ndarray:
        n, h, d = info.n_cells, info.n_heads, info.head_dim
        block = self._block(d, info.name)
        g = h * d // 8
        want, sink = self.stream_shapes(info)
        if self.uses_classes(info):
            cls = symbols.get("class")
            if cls is None or cls.shape != (h, d) or (cls.size and int(cls.max()) >= N_CLASSES):
                raise FormatError(f"{info.name}: component classes missing, not of shape {(h, d)} or above {N_CLASSES - 1}")
            symbols = {**symbols, **_join_by_class(symbols, column_classes(cls), info.name)}
        if "bucket" in symbols:
            self.check_buckets(symbols["bucket"], info)
            symbols = {**symbols, **_join_by_bucket(symbols, symbols["bucket"], g, info.name)}
        for name, shape in want.items():
            if name not in symbols or symbols[name].shape != shape:
                raise FormatError(f"{info.name}: lattice symbols {name!r} missing or not of shape {shape}")
        coset = symbols["coset"]
        if coset.size and int(coset.max()) > 1:
            raise FormatError(f"{info.name}: lattice coset symbols must be 0 or 1")
        step = self.cell_steps(symbols["scale"], info, symbols.get("bucket"))
        group_step = np.repeat(step.reshape(n, -1), block // 8, axis=1)  # [n, g]: each 8-value group's step
        mean = symbols["mean"].astype(np.uint16).view(np.float16).astype(np.float64) if self.center else np.zeros(0)
        basis = symbols.get("basis") if "basis" in want else None
        if basis is not None and basis.size and int(np.abs(basis.astype(np.int64)).max()) > 1 << (self.basis_bits - 1):
            raise FormatError(f"{info.name}: basis entries beyond {self.basis_bits} bits")
        if basis is None:
            x = kernel("lattice_dequantize")(coset, _int32(symbols["coord"]), _int32(symbols["coord_last"]), group_step,
                                             mean).reshape(n, h, d)
        else:  # one step per head vector (scale_scope head)
            x = kernel("basis_dequantize")(coset, _int32(symbols["coord"]), _int32(symbols["coord_last"]), step[:, :, 0],
                                           basis, self.basis_bits - 1, mean, self.channel_scale(symbols, info, sink))
        if self.sinks:
            x[sink] = symbols["sink"].astype(np.uint16).view(np.float16)
        return x

    def _sink_rows(self, info: TensorInfo, n: int) -> np.ndarray:
        if not self.sinks or info.positions is None:
            return np.zeros(n, bool)
        return np.asarray(info.positions)[:n] < self.sinks

    def _broadcast(self, step: np.ndarray, n: int) -> np.ndarray:
        """Steps as [n, h, blocks] whatever the scale scope."""
        return np.broadcast_to(step[None], (n,) + step.shape) if self.scale_scope == "head" else step


def _int32(a: np.ndarray) -> np.ndarray:
    """Coordinates as the kernels take them; entropy coding keeps them in int32 (anything wider
    would not have been written by encode)."""
    if a.dtype != np.int32:
        if a.size and (int(a.min()) < -(1 << 31) or int(a.max()) >= 1 << 31):
            raise FormatError("lattice coordinates outside int32")
        a = a.astype(np.int32)
    return a


def _rows_except(x: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """x's cells (first axis) where sink is False: a view where they are one run of cells (the
    sinks are the first positions, and llama.cpp keeps cells in position order), else a copy."""
    keep = np.flatnonzero(~sink)
    if keep.size and keep[-1] - keep[0] + 1 == keep.size:
        return x[keep[0] : keep[-1] + 1]
    return x[keep]


def _head_mean_square(x: np.ndarray) -> np.ndarray:
    """float64 [h]: the mean square of each head of x [n, h, d], a block of cells at a time (no
    whole-section temporary). One head (a head group coded as one vector, as the presets do):
    summed as numpy sums a contiguous array (pairwise, halves cut at multiples of 8), so the
    result is the same as (x**2).mean() to the last bit."""
    n, h, d = x.shape
    if h == 1:
        return np.array([_pairwise_square_sum(x.reshape(-1)) / x.size]) if x.size else np.array([np.nan])
    total = np.zeros(h)
    for start in range(0, n, CELL_BLOCK):
        total += np.square(x[start : start + CELL_BLOCK]).sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / (n * d)


def _pairwise_square_sum(v: np.ndarray) -> float:
    if v.size <= CELL_BLOCK * 64:
        return float(np.square(v).sum())
    half = v.size // 2
    half -= half % 8
    return _pairwise_square_sum(v[:half]) + _pairwise_square_sum(v[half:])


_POINT_STREAMS = {"coset": (), "coord": (7,), "coord_last": ()}


def _split_by_bucket(points: dict, buckets: np.ndarray) -> dict:
    """Point streams [n, g, ...] as one stream per bucket value, `name.b`: the rows of the cells
    with that bucket, in cell order."""
    return {f"{name}.{int(b)}": points[name][buckets == b] for b in np.unique(buckets) for name in _POINT_STREAMS}


def _join_by_bucket(symbols: dict, buckets: np.ndarray, g: int, where: str) -> dict:
    """Inverse of _split_by_bucket."""
    out = {}
    for name, tail in _POINT_STREAMS.items():
        joined = np.zeros((buckets.shape[0], g) + tail, np.uint8 if name == "coset" else np.int32)
        for b in np.unique(buckets):
            mask = buckets == b
            part = symbols.get(f"{name}.{int(b)}")
            if part is None or part.shape != (int(mask.sum()), g) + tail:
                raise FormatError(f"{where}: lattice symbols {name}.{int(b)} missing or not of shape {(int(mask.sum()), g) + tail}")
            joined[mask] = part
        out[name] = joined
    return out


def rate_costs(points: tuple, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """float64 [n_rows, 2 RDO_SPAN + 1]: bits of each doubled coordinate value (clipped to
    +-RDO_SPAN) in each cost row, from the counts of the stored points (coset, coord,
    coord_last) of m groups, group i's eight values counted in rows[i] .. rows[i] + 7; lightly
    smoothed, rounded to 1/256 bit so that a last-place difference in log2 between machines does
    not move a choice. Counted a coordinate at a time in int32 (whole-section int64 copies of
    the points were most of a save's peak memory and half of this step's time)."""
    width = 2 * RDO_SPAN + 1
    coset, coord, last = (np.asarray(p, np.int32) for p in points)
    coord = coord.reshape(-1, 7)
    eighth = eighth_coordinates(coord, last)
    index = np.empty(rows.shape, np.int64)
    counts = np.zeros(n_rows * width, np.int64)
    for j in range(8):
        z = coord[:, j] if j < 7 else eighth
        v = np.clip(z, -RDO_SPAN, RDO_SPAN)
        v *= 2
        v += coset  # twice the coordinate, clipped
        np.clip(v, -RDO_SPAN, RDO_SPAN, out=v)
        np.multiply(rows, width, out=index)  # the group's row, coordinate j, value v
        index += v
        index += j * width + RDO_SPAN
        counts += np.bincount(index, minlength=n_rows * width)
    alpha = 0.05
    bits = counts.reshape(n_rows, width).astype(np.float64)
    del counts
    # -log2((counts + alpha) / (row total + alpha width)) in 1/256 bits, in place (the table is
    # 1-2 MB: its temporaries were a third of this step's memory)
    total = bits.sum(axis=1, keepdims=True) + alpha * width
    bits += alpha
    bits /= total
    np.log2(bits, out=bits)
    bits *= -256.0
    np.round(bits, out=bits)
    bits /= 256.0
    return bits


def eighth_coordinates(coord: np.ndarray, last: np.ndarray) -> np.ndarray:
    """int32: each stored point's eighth integer coordinate, 2 coord_last + parity(coord's seven)
    (coord int32 [..., 7], last int32 [...]), summed a column at a time (no int64 copies: the
    sums wrap, keeping the low bit, and the result is a stored coordinate, within int32)."""
    parity = coord[..., 0].copy()
    for j in range(1, 7):
        parity += coord[..., j]
    return 2 * np.asarray(last, np.int32) + (parity & 1)


def weak_components(y: np.ndarray, step: np.ndarray, sink: np.ndarray, threshold: float) -> np.ndarray:
    """bool [h, d]: the components of y [n, h, d] (coefficients on the principal axes) whose
    mean square in steps (step [n, h]) over the cells that are not sinks is below threshold."""
    n, h, d = y.shape
    step = np.asarray(step, np.float64)
    with np.errstate(divide="ignore"):  # a zero step (a head of zeros) weighs nothing: its points are zero
        weight = np.where(sink[:, None] | (step <= 0), 0.0, 1.0 / np.square(step))  # [n, h]
    total = np.zeros((h, d))
    for start in range(0, n, 1024):  # a block of cells at a time: no whole-section temporaries
        block = y[start : start + 1024]
        total += np.einsum("chj,chj,ch->hj", block, block, weight[start : start + 1024])
    return total < threshold * max(int((~sink).sum()), 1)


def unused_components(points: tuple, n: int, h: int, d: int, sink: np.ndarray) -> np.ndarray:
    """bool [h, d]: the components whose stored points (coset, coord, coord_last of n cells'
    h d / 8 groups, lattice_quantize's layout) are zero in every cell that is not a sink (the
    decoder replaces the sinks' values)."""
    g = h * d // 8
    coset, coord, last = points
    z = np.asarray(coord, np.int32).reshape(n, g, 7)
    nonzero = np.empty((n, g, 8), bool)
    np.not_equal(z, 0, out=nonzero[:, :, :7])
    np.not_equal(eighth_coordinates(z, np.asarray(last).reshape(n, g)), 0, out=nonzero[:, :, 7])
    nonzero |= (np.asarray(coset).reshape(n, g) != 0)[:, :, None]  # D8 + 1/2: no coordinate is zero
    return ~nonzero[~sink].any(axis=0).reshape(h, d)


def pca_basis(x: np.ndarray, bits: int) -> np.ndarray:
    """int16 [h, d, d]: for each head of x [m, h, d] (float64, centred), the principal axes of
    its vectors as rows, largest variance first, each row's largest entry positive, in units of
    2^-(bits-1). A head whose rounded axes are singular gets the identity (exactly stored)."""
    m, h, d = x.shape
    one = 1 << (bits - 1)
    out = np.empty((h, d, d), np.int16)
    for k in range(h):
        xk = x[:, k, :]
        _, vec = np.linalg.eigh(xk.T @ xk)
        axes = vec[:, ::-1].T
        sign = np.where(axes[np.arange(d), np.abs(axes).argmax(axis=1)] < 0, -1.0, 1.0)
        q = np.round(axes * sign[:, None] * one)
        if not np.isfinite(q).all() or _ill_conditioned(q, one):
            q = np.eye(d) * one
        out[k] = q
    return out


def _ill_conditioned(q: np.ndarray, one: int) -> bool:
    """Whether the rounded axes q (rows about `one` times orthonormal ones) have a condition
    number above 1e6. Where q q^T / one^2 - I/4 has a Cholesky factor, every singular value of
    q / one is above 1/2 and none above sqrt(d) (rows of norm <= sqrt(d)), so the condition
    number is below 2 sqrt(d): the SVD is needed only otherwise (it was a tenth of a save's
    encoding time; rounding to 8 bits moves 192-value axes only ~0.05 from orthonormal)."""
    g = q @ q.T / float(one) ** 2
    g[np.diag_indices_from(g)] -= 0.25
    try:
        np.linalg.cholesky(g)
        return False
    except np.linalg.LinAlgError:
        return bool(np.linalg.cond(q) > 1e6)


def to_basis(x: np.ndarray, basis: np.ndarray, bits: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 [n, h, d] coefficients y with y[:, k] @ basis[k] / 2^(bits-1) = x[:, k] (what
    basis_dequantize maps back), into `out` where given (x itself may be it: made a block of
    cells at a time, no second whole-section array)."""
    scaled = basis.astype(np.float64) / (1 << (bits - 1))
    if out is None:
        out = np.empty_like(x, np.float64)
    for k in range(x.shape[1]):
        inverse = np.linalg.inv(scaled[k])
        for start in range(0, x.shape[0], CELL_BLOCK):
            out[start : start + CELL_BLOCK, k, :] = x[start : start + CELL_BLOCK, k, :] @ inverse
    return out


def channel_scales(energy, h: int, d: int) -> np.ndarray:
    """float16 [h, d]: each K channel's scale, (its query energy / the head's mean)^-1/2 within
    2^-6 .. 2^6: K is divided by it before the basis is fitted, so that the quantizer's error
    lands where the queries do not look (SmolLM2, 4096 tokens: 4-9% smaller at equal or lower KLD
    on the benchmark's texts, 0-2% on two others: README). Ones where the energy is missing
    (nothing was captured) or not usable."""
    out = np.ones((h, d))
    if energy is not None:
        e = np.asarray(energy, np.float64).reshape(h, d)
        for k in range(h):
            if np.isfinite(e[k]).all() and e[k].sum() > 0:
                out[k] = np.clip(e[k] / e[k].mean(), 2.0**-12, 2.0**12) ** -0.5
    return out.astype(np.float16)


def component_classes(rms: np.ndarray, step: np.ndarray) -> np.ndarray:
    """uint8 [h, d]: each component's octave of RMS / its head's step (step [h, 1]), offset by
    CLASS_OFFSET, within 0 .. N_CLASSES-1; 0 where the RMS or the step is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        octave = np.floor(np.log2(rms / np.asarray(step, np.float64).reshape(-1, 1)))
    c = np.clip(np.nan_to_num(octave + CLASS_OFFSET, nan=0.0, posinf=N_CLASSES - 1, neginf=0.0), 0, N_CLASSES - 1)
    return c.astype(np.uint8)


def column_classes(cls: np.ndarray) -> dict[str, np.ndarray]:
    """Point stream -> the class of each of its columns (per cell: groups, or groups x 7),
    from the component classes [h, d]: coord_last is component 7 of its group, a coset takes
    its group's largest class."""
    groups = cls.reshape(-1, 8)
    return {"coset": groups.max(axis=1), "coord": groups[:, :7].reshape(-1), "coord_last": groups[:, 7]}


def _split_by_class(points: dict, column_class: dict) -> dict:
    """Point streams (plain or per bucket) as one stream per component class, `name.cK`: the
    columns of that class, row by row."""
    out = {}
    for name, a in points.items():
        cols = column_class[name.split(".")[0]]
        flat = a.reshape(a.shape[0], -1)
        for c in np.unique(cols):
            out[f"{name}.c{int(c)}"] = np.ascontiguousarray(flat[:, cols == c])
    return out


def _join_by_class(symbols: dict, column_class: dict, where: str) -> dict:
    """Inverse of _split_by_class for every point stream found split (the plain ones, or those
    of each bucket)."""
    out = {}
    prefixes = {k.rsplit(".c", 1)[0] for k in symbols if ".c" in k and k.split(".")[0] in column_class}
    for prefix in sorted(prefixes):
        base = prefix.split(".")[0]
        cols = column_class[base]
        parts = {int(c): symbols.get(f"{prefix}.c{int(c)}") for c in np.unique(cols)}
        rows = {p.shape[0] for p in parts.values() if p is not None}
        if any(p is None for p in parts.values()) or len(rows) != 1:
            raise FormatError(f"{where}: lattice symbols {prefix} by component class missing or of unequal rows")
        n_rows = rows.pop()
        joined = np.zeros((n_rows, cols.size), np.uint8 if base == "coset" else np.int32)
        for c, part in parts.items():
            want = (n_rows, int((cols == c).sum()))
            if part.shape != want:
                raise FormatError(f"{where}: lattice symbols {prefix}.c{c} not of shape {want}")
            joined[:, cols == c] = part
        out[prefix] = joined.reshape((n_rows, -1, 7) if base == "coord" else (n_rows, -1))
    return out
