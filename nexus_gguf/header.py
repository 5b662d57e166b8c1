"""The .nxkv header, in one place: built at save time (build_header) and read back (Header), with
every size it states checked before anything is allocated: against the file's own other fields
and, when a model is loaded, against that model's and context's numbers (Limits). The container
(magic, section table, CRCs) is format.py's; what the sections hold is state_file.py's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from .errors import FormatError, ModelMismatchError
from .eviction import legacy_stage_record
from .ggml_types import GgmlType
from .pipeline import Pipeline

MAX_TOKENS = 1 << 26  # no context holds more (llama.cpp's n_ctx is a u32, and far below this)
LOGITS_DTYPES = ("f32", "f16")


@dataclass(frozen=True)
class Limits:
    """The largest sizes a state may have: from the model and context it is loaded into, or,
    reading a file without a model, from the model record in its own header."""

    n_ctx: int  # cells per stream and prompt tokens
    n_layer: int  # layers per cache
    n_embd_k: int  # K values per cell of one layer (n_head_kv * head size; n_head bounds n_head_kv)
    n_embd_v: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int

    @classmethod
    def of_model(cls, facts, n_ctx: int) -> "Limits":
        """For a loaded model (llama_bridge.ModelFacts) and context size."""
        return cls(int(n_ctx), int(facts.n_layer), int(facts.n_head) * int(facts.n_embd_head_k),
                   int(facts.n_head) * int(facts.n_embd_head_v), int(facts.n_embd_head_k), int(facts.n_embd_head_v),
                   int(facts.n_vocab))

    def row_bytes(self, t: GgmlType, kind: str) -> int:
        """The most bytes one cell's K or V row of type t can take."""
        n = self.n_embd_k if kind == "k" else self.n_embd_v
        return -(-n // t.block_size) * t.type_size


_SHAPE_KEYS = ("arch", "n_layer", "n_head", "n_head_kv", "n_embd", "n_embd_head_k", "n_embd_head_v", "n_vocab")


def _describe(model: dict) -> str:
    name = f"{model['name']}, " if model.get("name") else ""
    weights = f", {model['weights']} weights" if model.get("weights") else ""
    return (f"{model.get('file_name', '?')} ({name}{model.get('arch', '?')}{weights}, "
            f"fingerprint {str(model.get('fingerprint'))[:12]})")


def _mismatch_message(source: str, saved: dict, facts) -> str:
    """Both sides, and what differs: a state holds what those exact weights computed, so even
    another quantization of the same model cannot continue it."""
    loaded = {k: getattr(facts, k, None) for k in (*_SHAPE_KEYS, "name", "file_name", "weights", "fingerprint")}
    head = f"{source} was saved from {_describe(saved)}; the loaded model is {_describe(loaded)}: "
    differs = [f"{k} {saved.get(k)} vs {loaded[k]}" for k in _SHAPE_KEYS if saved.get(k) != loaded[k]]
    if differs:
        return head + "another model (" + ", ".join(differs) + ")"
    what = (f"{saved['weights']} instead of {loaded['weights']} weights"
            if saved.get("weights") and saved["weights"] != loaded["weights"] else "other weights")
    return (head + f"the same architecture and shapes with {what} (another quantization or fine-tune of the "
            "model); a state holds what the exact weights computed, so save it again with this model")


def build_header(*, facts, context: dict, software: dict, n_tokens: int, n_pos: int, logits: Optional[dict],
                 pipeline: Pipeline, scoring: Optional[dict], eviction: Optional[dict], notes: dict, raw: dict,
                 state: dict) -> dict[str, Any]:
    """The header save_state writes (docs/FORMAT.md, "Header keys")."""
    header = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": software,
        "model": facts.to_json(),
        "context": context,
        "prompt": {"n_tokens": n_tokens, "n_pos": n_pos, "n_ctx_required": n_pos},
        "logits": logits,
        "pipeline": pipeline.get_config(),
        "raw": raw,
        "state": state,
    }
    if scoring is not None:
        header["scoring"] = scoring
    if eviction is not None:
        header["eviction"] = eviction
    if notes:
        header["notes"] = notes
    return header


def _int(d: Mapping, key: str, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(key) if isinstance(d, Mapping) else None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise FormatError(f"header {where}.{key}: {v!r} is not an integer in {lo}..{hi}")
    return v


def _obj(d: Mapping, key: str, where: str = "") -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise FormatError(f"header {where + '.' if where else ''}{key}: missing or not an object")
    return v


class Header:
    """A file's header, read and checked. Accessors return validated values; `limits()` gives
    the bounds from the file's own model record, `check_model()` compares it with a loaded
    model and gives that model's bounds."""

    def __init__(self, header: Mapping[str, Any], source: str = "<header>"):
        self.raw_header = dict(header)
        self.source = source
        h = self.raw_header
        try:
            self.model = _obj(h, "model")
            self.context = _obj(h, "context")
            prompt = _obj(h, "prompt")
            self.n_tokens = _int(prompt, "n_tokens", "prompt", 1, MAX_TOKENS)
            self.n_pos = _int(prompt, "n_pos", "prompt", 1, MAX_TOKENS)
            self.n_ctx_required = _int(prompt, "n_ctx_required", "prompt", 1, MAX_TOKENS)
            raw = _obj(h, "raw")
            self.raw_bytes = _int(raw, "bytes", "raw", 1)
            self.raw_crc32 = _int(raw, "crc32", "raw", 0, 0xFFFFFFFF)
            self.state = _obj(h, "state")
            self.logits = h.get("logits")
            if self.logits is not None:
                if not isinstance(self.logits, dict) or self.logits.get("dtype") not in LOGITS_DTYPES:
                    raise FormatError(f"header logits: {self.logits!r} is not a logits description")
                _int(self.logits, "n_vocab", "logits", 1, 1 << 24)
            pipeline = _obj(h, "pipeline")
            if not isinstance(pipeline.get("stages", []), list):
                raise FormatError("header pipeline.stages: not a list")
        except FormatError as e:
            raise FormatError(f"{source}: {e}") from None
        self.pipeline = Pipeline.from_config(pipeline)

    def _legacy_evict_stage(self) -> Optional[dict]:
        stages = self.raw_header["pipeline"].get("stages") or []
        if stages and isinstance(stages[0], dict) and stages[0].get("id") == "evict":
            return legacy_stage_record(stages[0])
        return None

    @property
    def eviction(self) -> Optional[dict]:
        """What eviction did (eviction.eviction_record), or None if the file kept every cell."""
        if isinstance(self.raw_header.get("eviction"), dict):
            return self.raw_header["eviction"]
        return self._legacy_evict_stage()

    @property
    def scoring(self) -> Optional[dict]:
        """How importance was measured: scorer and window asked, scorer used, note; or None."""
        if isinstance(self.raw_header.get("scoring"), dict):
            return self.raw_header["scoring"]
        old = self._legacy_evict_stage()
        if old is None:
            return None
        return {k: old.get(k) for k in ("scorer", "window", "used", "note")}

    def limits(self) -> Limits:
        """Bounds from the model record this file carries (used when no model is loaded)."""
        m = self.model
        try:
            n_head = _int(m, "n_head", "model", 1, 1 << 16)
            hk = _int(m, "n_embd_head_k", "model", 1, 1 << 16)
            hv = _int(m, "n_embd_head_v", "model", 1, 1 << 16)
            return Limits(max(self.n_pos, self.n_tokens), _int(m, "n_layer", "model", 1, 1 << 12), n_head * hk,
                          n_head * hv, hk, hv, _int(m, "n_vocab", "model", 1, 1 << 24))
        except FormatError as e:
            raise FormatError(f"{self.source}: {e}") from None

    def check_model(self, facts, n_ctx: int) -> Limits:
        """That this file was saved from `facts`' model (fingerprint), and the bounds of that
        model and a context of n_ctx cells."""
        saved = self.model
        if saved.get("fingerprint") != facts.fingerprint:
            raise ModelMismatchError(_mismatch_message(self.source, saved, facts))
        limits = Limits.of_model(facts, n_ctx)
        if self.logits is not None and self.logits["n_vocab"] != limits.n_vocab:
            raise FormatError(f"{self.source}: logits of {self.logits['n_vocab']} tokens, the model has {limits.n_vocab}")
        return limits
