"""save_state / load_state / read_info: the public operations."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from . import bit_profile
from . import llama_bridge as bridge
from .backends import recording
from .errors import ChecksumError, ConfigError, FormatError, NxkvError, RestoreError
from .eviction import eviction_record
from .format import NxkvFile, SpooledSections, crc32, read_header
from .heap import release_freed_memory, save_memory_budget
from .storage import is_url, write_atomic
from .header import Header, build_header
from .llama_state import parse_state, write_state
from .pipeline import DEFAULT_PRESET, Pipeline, build_pipeline
from .stages import ModelBinding
from .state_file import decode_logits, decode_state_blob, decode_tokens, encode_logits, encode_tokens, iter_encode_state, value_dims


@dataclass
class SaveReport:
    path: str
    preset: str
    n_tokens: int
    raw_bytes: int  # the llama.cpp state blob
    file_bytes: int  # the .nxkv file, every header byte counted
    seconds: dict[str, float] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)  # kernel op -> the backend that ran it
    scoring: Optional[dict] = None  # how importance was measured (the header's "scoring"), if it was
    eviction: Optional[dict] = None  # what eviction did (the header's "eviction"), if the preset evicts
    # the bit profile whose per-layer bits the lattice used (its name), "" where the layers got
    # the preset's bits alike, None where no stage takes a profile (lossless, seed)
    bit_profile: Optional[str] = None

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.file_bytes

    def summary(self) -> str:
        return (
            f"{self.path}: {self.n_tokens} tokens, raw {self.raw_bytes:,} B -> file {self.file_bytes:,} B "
            f"({self.ratio:.2f}x, {self.preset}) in {sum(self.seconds.values()):.2f}s"
        )


@dataclass
class LoadReport:
    path: str
    n_tokens: int
    raw_bytes: int
    file_bytes: int
    exact: bool  # the restored cache is byte-identical to the one saved (checked for lossless files)
    seconds: dict[str, float] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)  # kernel op -> the backend that ran it
    # next-token logits saved with the prompt (None if the file has none): sampling can start
    # from them without decoding the last prompt token again
    logits: Optional[np.ndarray] = field(default=None, repr=False)
    converted: bool = False  # rewritten for the Llama's cache types or V layout (cache_convert)
    tokens: Optional[np.ndarray] = field(default=None, repr=False)  # the prompt the sequence now holds

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.file_bytes


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def save_state(llm, path, preset: str | Pipeline = DEFAULT_PRESET, without: Sequence[str] = (), *, seq_id: int = 0,
               tokens: Optional[Sequence[int]] = None, bit_profile: Any = "auto", **stage_overrides: Any) -> SaveReport:
    """Store the prompt state of `llm` (sequence 0: its KV cache, prompt tokens and last
    logits) in the .nxkv file `path`, written atomically. Stages named in `without` are left
    out of the preset and options overridden as `<stage>_<option>=value`, e.g.
    lattice_k_bits=4, zstd_level=19 or evict_keep=0.3; `preset` may also be a Pipeline built
    by hand (then without either).

    Another sequence of a multi-sequence context: `seq_id`, with the `tokens` it holds (the
    Llama's own bookkeeping follows sequence 0 only; no logits row is stored then).

    bit_profile: the bits each layer's K and V get beyond the preset's (bit_profile.py): "auto"
    finds the model's (NEXUS_GGUF_BIT_PROFILE, the user's profiles, those shipped), None
    codes every layer alike, or a BitProfile or the path of one measured on this model."""
    if isinstance(preset, Pipeline):
        if stage_overrides or without:
            raise ConfigError("stage options go into the Pipeline itself when one is given")
        pipeline = preset
    else:
        pipeline = build_pipeline(preset, without, **stage_overrides)
    timer = _Timer()
    facts = bridge.model_facts(llm)
    profile = _bit_profile(bit_profile, facts)
    pipeline = pipeline.bind(ModelBinding(facts, bridge.context_facts(llm, rope=True), profile))
    if tokens is None:
        if seq_id != 0:
            raise ConfigError(f"saving sequence {seq_id} needs the tokens it holds: save_state(..., seq_id={seq_id}, tokens=...)")
        tokens, logits = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32), bridge.last_logits(llm)
    else:
        tokens, logits = np.asarray(tokens, dtype=np.int32).reshape(-1), None
    n_tokens = int(tokens.size)
    if n_tokens == 0 or not bridge.holds_cells(llm, seq_id):
        raise NxkvError(f"sequence {seq_id} of the Llama holds no evaluated tokens: evaluate the prompt first (llm.eval(tokens))")
    # in pages of its own: each layer's rows are given back once its sections are made
    blob, pages = bridge.get_seq_state(llm, seq_id, pages=True)
    raw = {"bytes": len(blob), "crc32": crc32(blob), "kind": "sequence"}
    timer.lap("state_get")
    state = parse_state(blob, "sequence", facts.state_layout())
    if state.n_pos != n_tokens:
        raise NxkvError(
            f"sequence {seq_id} holds positions up to {state.n_pos - 1} but {n_tokens} tokens were named; "
            "save right after evaluating the prompt"
        )
    timer.lap("parse")
    eviction = scoring = importance = queries = None
    # what waits on disk during the save (the capture's cells, the encoded sections) waits beside the target
    local_dir = None if is_url(os.fspath(path)) else os.path.dirname(os.path.abspath(path))
    n_cells = max((len(s.cells) for c in state.caches for s in c.streams if s is not None), default=0)
    if pipeline.needs_scores_at(n_cells):
        state, scoring, eviction, importance, queries = _score_and_evict(llm, blob, state, tokens, pipeline,
                                                                         pipeline.importance_used_at(n_cells),
                                                                         pipeline.queries_used_at(n_cells), local_dir)
        release_freed_memory()  # the scoring's side context, before the encoder's threads allocate
        timer.lap("scoring")
    # sections go to a spool as they are made: past 4 MiB (or an eighth of a small state) they
    # wait in a temporary file beside the target, so saving holds the state and the layers being
    # encoded, not the file too (at 7680 tokens a high file is 29 MB: 16% of the raw state)
    spool = SpooledSections(max(1 << 20, min(len(blob) // 8, 4 << 20)), local_dir, os.fspath(path))
    with recording() as backends, spool:
        layout, sections = iter_encode_state(state, pipeline, value_dims(facts.n_embd_head_k, facts.n_embd_head_v),
                                             importance, queries=queries, done_with=pages.release,
                                             memory_budget=save_memory_budget(raw["bytes"]))
        spool.add("tokens", encode_tokens(tokens))
        # a lossy state cannot reproduce the prompt's logits to the last bit anyway; f16 halves them
        logits_dtype = "f32" if pipeline.lossless else "f16"
        if logits is not None:
            spool.add("logits", encode_logits(logits, logits_dtype))
        for name, data in sections:
            spool.add(name, data)
        timer.lap("encode")
        header = build_header(
            facts=facts, context=bridge.context_facts(llm), software=bridge.software_versions(), n_tokens=n_tokens,
            n_pos=state.n_pos, logits=None if logits is None else {"dtype": logits_dtype, "n_vocab": int(logits.shape[0])},
            pipeline=pipeline, scoring=scoring, eviction=eviction,
            notes={s.stage_id: s.note for s in pipeline.stages if s.note},
            raw=raw, state=layout,
        )
        file_bytes = write_atomic(path, spool.buffers(header))
    timer.lap("write")
    return SaveReport(os.fspath(path), pipeline.preset or "custom", n_tokens, raw["bytes"], file_bytes, timer.seconds,
                      dict(backends), scoring, eviction, (profile.name if profile else "") if pipeline.takes_bit_profile else None)


def _bit_profile(choice, facts) -> Optional[bit_profile.BitProfile]:
    if choice is None or (isinstance(choice, str) and choice.lower() == "none"):
        return None
    if isinstance(choice, str) and choice == "auto":
        return bit_profile.find(facts)
    profile = choice if isinstance(choice, bit_profile.BitProfile) else bit_profile.read(choice)
    return profile.require_fits(facts, f"bit profile {profile.name}")


def _score_and_evict(llm, blob: bytes, state, tokens, pipeline: Pipeline, importance_used: bool, energy: bool,
                     spool_dir: Optional[str] = None):
    """Score the cells; keep the most important if the pipeline evicts. (state, the header's
    scoring and eviction records, per-cell importance where a stage codes by it
    (`importance_used`) and, with `energy`, per-layer query energy for the stages that use
    them)."""
    from .scoring import score_cells

    options = pipeline.scoring
    scores = score_cells(llm, blob, state, tokens, options.window, options.scorer, options.chunk, options.stride, options.span,
                         importance=pipeline.eviction is not None or importance_used, energy=energy,
                         context=options.context, exact_importance=pipeline.eviction is not None, spool_dir=spool_dir)
    if scores.note:
        warnings.warn(f"nexus-gguf: {scores.note}", RuntimeWarning, stacklevel=4)
    record = {**options.get_config(), "used": scores.scorer, "note": scores.note}
    eviction = None
    if pipeline.eviction is not None:
        pos = next(s for s in state.caches[0].streams if s is not None).cells.pos
        keep = pipeline.eviction.choose(scores.importance, pos)
        state, importance = state.keep_cells(keep), scores.importance[keep]
        eviction = eviction_record(pipeline.eviction, int(pos.size), int(keep.size))
    else:
        importance = scores.importance
    return state, record, eviction, importance if importance_used else None, scores.query_energy


def load_state(llm, path, *, seq_id: int = 0) -> LoadReport:
    """Restore a .nxkv file into `llm` so that it continues as if it had just evaluated the
    saved prompt. Everything is read, checked and decoded before llama.cpp is touched; if
    llama.cpp still refuses the state, the Llama is put back as it was and RestoreError raised.
    A Llama with other cache types (type_k / type_v) or flash attention than the saving one gets
    the state converted to them (LoadReport.converted). `seq_id`: restore into that sequence of
    a multi-sequence context instead (the Llama's own bookkeeping, which follows sequence 0, is
    then left alone; LoadReport.tokens says what the sequence holds)."""
    timer = _Timer()
    with NxkvFile.open(path) as f:
        timer.lap("read")
        d = _decode(llm, f)  # every section's CRC is checked as it is read
        timer.lap("decode")
    blobs = _into_stream(llm, d, seq_id)
    taken = _restore_or_roll_back(llm, blobs, f.source, seq_id)
    if seq_id == 0:
        bridge.set_prompt(llm, d.tokens, d.logits)
    timer.lap("llama_set")
    return LoadReport(f.source, d.header.n_tokens, d.header.raw_bytes, f.file_bytes, d.exact and taken is d.saved_blob,
                      timer.seconds, d.backends, d.logits, converted=taken is not d.saved_blob, tokens=d.tokens)


@dataclass
class _Decoded:
    header: Header
    tokens: np.ndarray
    logits: Optional[np.ndarray]
    saved_blob: Any  # bytes-like: the state as saved (types and layout of the saving context)
    blobs: list  # what to hand llama.cpp, in order of preference (the Llama's types and layout)
    exact: bool  # saved_blob is byte-identical to the state that was saved
    backends: dict


def _decode(llm, f: NxkvFile) -> _Decoded:
    """Check a verified file against the Llama and decode it, touching nothing in llama.cpp."""
    header = Header(f.header, f.source)
    limits = header.check_model(bridge.model_facts(llm), bridge.context_capacity(llm))
    bridge.require_restorable(llm, header)
    with recording() as backends:
        try:
            tokens = decode_tokens(f.section("tokens"), header.n_tokens, limits)
            logits = None
            if header.logits is not None:
                logits = decode_logits(f.section("logits"), header.logits["n_vocab"], header.logits["dtype"], limits)
            blob, state = decode_state_blob(header.state, header.pipeline, f.section, limits, f.concurrent_reads)
        except ChecksumError:
            raise  # names the file and the section already
        except FormatError as e:
            raise FormatError(f"{f.source}: {e}") from None
        # a lossy pipeline does not give the saved bytes back: its blob is not checksummed (a
        # CRC of the whole state costs a tenth of a lossy load)
        exact = header.pipeline.lossless and len(blob) == header.raw_bytes and crc32(blob) == header.raw_crc32
        if header.pipeline.lossless and not exact:
            raise ChecksumError(f"{f.source}: the restored state does not match the saved one (CRC of the rebuilt state)")
        blobs = _in_target_layout(llm, state, blob)
    return _Decoded(header, tokens, logits, blob, blobs, exact, dict(backends))


def _into_stream(llm, d: "_Decoded", seq_id: int) -> list[bytes]:
    """d's blobs with the cells in the stream sequence seq_id has in the Llama's context."""
    from .cache_convert import into_stream

    n_stream, index = bridge.stream_of(llm, seq_id)
    layout = bridge.model_facts(llm).state_layout()
    out = []
    for b in d.blobs:
        state = parse_state(b, "sequence", layout)
        moved = into_stream(state, n_stream, index)
        out.append(b if moved is state else write_state(moved))
    return out


def decode_for(llm, f: NxkvFile) -> tuple[np.ndarray, bytes]:
    """(prompt tokens, sequence state for llm's cache) of a file (every section checksummed as
    it is read), llama.cpp untouched: for callers that hand the state to llama.cpp themselves
    (prompt_cache)."""
    d = _decode(llm, f)
    return d.tokens, d.blobs[0]


def _in_target_layout(llm, state, blob: bytes) -> list[bytes]:
    """The state blob in the Llama's cache types and V layout, converted where they differ
    (cache_convert); where flash attention is "auto", both V layouts, the saved one first."""
    from .cache_convert import convert_state, layout_of

    saved = layout_of(state)
    if saved is None:
        return [blob]
    k_type, v_type, v_trans = bridge.cache_target(llm)
    facts = bridge.model_facts(llm)
    out = []
    for vt in [v_trans] if v_trans is not None else [saved[2], not saved[2]]:
        if (k_type, v_type, vt) == saved:
            out.append(blob)
        elif vt and not v_type.float_bytes:
            continue  # a quantized V cannot be transposed
        else:
            out.append(write_state(convert_state(state, k_type, v_type, vt, facts.n_embd_head_k, facts.n_embd_head_v)))
    return out


def _restore_or_roll_back(llm, blobs: list[bytes], source: str, seq_id: int = 0) -> bytes:
    """Set the first blob llama.cpp takes into sequence seq_id, and return it; if it takes
    none, put the sequence back as it was and raise RestoreError."""
    # what to put back if llama.cpp refuses: nothing when the Llama holds no prompt (after
    # reset() its stale cells are dropped by the next eval anyway; copying them costs as much as
    # the raw state)
    empty = seq_id == 0 and getattr(llm, "n_tokens", 1) == 0
    backup = bridge.get_seq_state(llm, seq_id) if not empty and bridge.holds_cells(llm, seq_id) else None
    for blob in blobs:
        if bridge.set_seq_state(llm, blob, seq_id):
            return blob
    # llama.cpp cleared the sequence when it gave up; put back what was there.
    if backup is None or not bridge.set_seq_state(llm, backup, seq_id):
        bridge.clear_seq(llm, seq_id)
        if seq_id == 0:
            llm.n_tokens = 0
    raise RestoreError(f"llama.cpp refused the state in {source} (its log says why); the Llama was left as before")


def read_info(path, verify: bool = False) -> dict[str, Any]:
    """The header of a .nxkv file plus its sizes, reading only the header unless verify=True,
    which checks every section's checksum too (the header's own checksum always is)."""
    if verify:
        with NxkvFile.open(path) as f:
            f.verify()
            raw_header, sections, file_bytes = f.header, f.sections, f.file_bytes
    else:
        raw_header, sections, file_bytes = read_header(path)
    header = Header(raw_header, os.fspath(path))
    info = dict(raw_header)
    info["eviction"] = header.eviction
    info["scoring"] = header.scoring
    info["file_bytes"] = file_bytes
    info["ratio"] = header.raw_bytes / file_bytes
    info["sections"] = {name: s.length for name, s in sections.items()}
    info["verified"] = verify
    return info
