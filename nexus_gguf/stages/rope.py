"""Remove RoPE from keys before quantization and put it back after decoding.

llama.cpp caches keys after RoPE, so the same content at different positions is stored rotated
by different angles; without the rotation, a channel means the same thing in every cell. The
angles follow ggml's rope (ggml-cpu ops.cpp rope_yarn / ggml_rope_cache_init): NORM rotates
adjacent pairs (2i, 2i+1), NEOX the halves (i, i + n_rot/2); theta_i = p * base^(-2i/n_rot),
scaled by freq_scale, mixed with the unscaled angle by YaRN's ramp where ext_factor != 0.
YaRN's magnitude factor and per-dimension frequency factors are not applied: removal and
re-application use the same angles, so the round trip is exact whatever the model did; only
how well channels line up depends on matching it. Values (V) pass through untouched."""

from __future__ import annotations

import math

import numpy as np

from ..backends import kernel
from ..errors import ConfigError
from .base import ModelBinding, Stage, TensorInfo

# archs whose sliding-window layers use the global base and scale (llama.cpp src/models/*.cpp);
# elsewhere they use rope.freq_base_swa, default 10000, and scale 1
# llama_rope_scaling_type: what GGUF's rope.scaling.type names map to
ROPE_SCALING_TYPES = {"none": 0, "linear": 1, "yarn": 2, "longrope": 3}

SWA_USES_GLOBAL_ROPE = {"gemma2", "cohere2", "cohere2moe", "llama4", "exaone4", "exaone-moe", "afmoe", "dflash"}


class Rope(Stage):
    stage_id = "rope"
    lossless = False  # exact in real arithmetic; float32 rounding remains
    kind = "values"
    PARAMS = {
        "mode": (str, "auto"),  # auto (resolved at save) | norm | neox | off
        "n_rot": (int, 0),
        "freq_base": (float, 10000.0),
        "freq_scale": (float, 1.0),
        "freq_base_swa": (float, 10000.0),
        "freq_scale_swa": (float, 1.0),
        "ext_factor": (float, 0.0),
        "n_ctx_orig": (int, 0),
        "beta_fast": (float, 32.0),
        "beta_slow": (float, 1.0),
    }
    RETIRED = {"skipped": None}  # format 1 files of 0.1 kept bind()'s note here

    def validate(self) -> None:
        if self.mode not in ("auto", "norm", "neox", "off"):
            raise ConfigError(f"rope mode must be auto, norm, neox or off, got {self.mode!r}")
        if self.mode in ("norm", "neox") and (self.n_rot <= 0 or self.n_rot % 2 or not all(
                0 < v < float("inf") for v in (self.freq_base, self.freq_base_swa, self.freq_scale, self.freq_scale_swa))):
            # a base or scale of 0 or below turns the angles into NaN (or reverses them): refused by
            # name here rather than as values that are not finite after decoding
            raise ConfigError("rope needs an even n_rot > 0 and positive, finite freq_base(_swa) and freq_scale(_swa)")

    def bind(self, model: ModelBinding) -> "Rope":
        if self.mode != "auto":
            return self
        facts, ctx = model.facts, model.context
        rope = facts.rope
        if rope["type"] not in ("norm", "neox"):
            off = Rope(mode="off")
            off.note = f"RoPE type {rope['type']!r} is not inverted by this stage: keys are coded with RoPE on"
            return off
        base = float(ctx.get("rope_freq_base") or rope["freq_base"])
        # the context's scaling type wins over the model's (llama-context.cpp, llama_context()):
        # "none" never scales, "yarn" turns the YaRN mix on unless yarn_ext_factor says otherwise
        scaling = ctx.get("rope_scaling_type")
        if scaling is None or scaling < 0:
            scaling = ROPE_SCALING_TYPES.get(rope.get("scaling_type") or "linear", 1)
        scale = 1.0 if scaling == 0 else float(ctx.get("rope_freq_scale") or rope["freq_scale_train"] or 1.0)
        if facts.arch in SWA_USES_GLOBAL_ROPE:
            base_swa, scale_swa = base, scale
        else:
            base_swa, scale_swa = float(rope.get("freq_base_swa") or 10000.0), 1.0
        ext = ctx.get("yarn_ext_factor", -1.0)
        if ext is None or ext < 0:
            ext = 1.0 if scaling == 2 else 0.0
        n_ctx_orig = int(ctx.get("yarn_orig_ctx") or rope.get("original_context_length") or facts.n_ctx_train or 0)
        return Rope(
            mode=rope["type"], n_rot=int(rope["n_rot"]), freq_base=base, freq_scale=scale,
            freq_base_swa=base_swa, freq_scale_swa=scale_swa, ext_factor=float(ext), n_ctx_orig=n_ctx_orig,
            beta_fast=float(ctx.get("yarn_beta_fast") or 0) or 32.0, beta_slow=float(ctx.get("yarn_beta_slow") or 0) or 1.0,
        )

    def angles(self, positions: np.ndarray, sliding: bool) -> np.ndarray:
        """float64 [n_cells, n_rot / 2]: the angle of each rotated pair at each position."""
        base = self.freq_base_swa if sliding else self.freq_base
        scale = self.freq_scale_swa if sliding else self.freq_scale
        i = np.arange(self.n_rot // 2, dtype=np.float64)
        extrap = np.asarray(positions, np.float64)[:, None] * base ** (-2.0 * i / self.n_rot)
        theta = scale * extrap
        if self.ext_factor != 0.0:
            low, high = _yarn_corr_dims(self.n_rot, self.n_ctx_orig, base, self.beta_fast, self.beta_slow)
            ramp = (1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * self.ext_factor
            theta = theta * (1.0 - ramp) + extrap * ramp
        return theta

    def passes_through(self, info: TensorInfo) -> bool:
        return self.mode in ("off", "auto") or info.kind != "k"

    def _rotate(self, x: np.ndarray, info: TensorInfo, sign: float) -> np.ndarray:
        if self.passes_through(info):
            return x
        if info.positions is None or x.shape[-1] < self.n_rot:
            raise ConfigError(f"{info.name}: rope needs cell positions and head_dim >= n_rot")
        cos, sin = self._trig(np.asarray(info.positions), info.sliding, sign)
        return kernel("rope_rotate")(x, cos, sin, self.n_rot, self.mode != "norm")

    def _trig(self, positions: np.ndarray, sliding: bool, sign: float) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [n, n_rot/2] of the angles; every layer of a stream has the same cells,
        so they are computed once per (positions, sliding, direction), not once per layer."""
        key = (positions.tobytes(), bool(sliding), sign)
        cache = self.__dict__.setdefault("_trig_cache", {})
        got = cache.get(key)
        if got is None:
            theta = sign * self.angles(positions, sliding)
            got = (np.cos(theta), np.sin(theta))
            if len(cache) >= 4:  # a file has one or two streams of cells; keep it small
                cache.clear()
            cache[key] = got
        return got

    def encode(self, x: np.ndarray, info: TensorInfo) -> np.ndarray:
        return self._rotate(x, info, -1.0)

    def decode(self, x: np.ndarray, info: TensorInfo) -> np.ndarray:
        return self._rotate(x, info, 1.0)


def _yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims."""

    def corr_dim(n_rot: float) -> float:
        return n_dims * math.log(max(n_ctx_orig, 1) / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(corr_dim(beta_fast))), min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
