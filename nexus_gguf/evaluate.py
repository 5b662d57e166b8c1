"""`nexus-gguf eval`: size, quality and speed of every candidate way of storing a prompt state,
against the restore of the raw llama.cpp state, in one run on one machine.

For each prefix length N of a text: prefill the first N tokens, take the raw state, store it with
every candidate (our presets, their ablations, the baselines), restore each into the same
context and evaluate the next M tokens. Quality is computed as llama-perplexity
--kl-divergence computes it, from the full next-token distributions; the pass-key test shows
what KLD and PPL hide: whether a planted fact survives."""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import llama_bridge as bridge
from .api import load_state, save_state
from .baselines import Baseline, RawBaseline, default_baselines
from .errors import ConfigError, NxkvError
from .llama_state import parse_state
from .pipeline import Pipeline, ablations, build_pipeline

PASS_KEY_INTRO = "There is a pass key hidden in the following text. Find it and remember it.\n\n"
PASS_KEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASS_KEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
PASS_KEY_ANSWER_TOKENS = 8


# ---------------------------------------------------------------- metrics (llama-perplexity's)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation between sorted values."""
    v = np.sort(np.asarray(values, np.float64))
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, v.size - 1)])


def continuation_metrics(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Quality of `logits` against `ref_logits` (both [n, n_vocab], row i predicting targets[i]):
    KLD(ref || candidate) per token (mean, median, p99, max), top-1 agreement ("same top p"),
    Δp = p_candidate(target) - p_ref(target) (mean, RMS) and PPL(candidate) / PPL(ref)."""
    ref_logits = np.asarray(ref_logits)
    logits = np.asarray(logits)
    targets = np.asarray(targets, np.int64)
    if ref_logits.shape != logits.shape or ref_logits.ndim != 2 or targets.shape != (ref_logits.shape[0],):
        raise ValueError("logits must be [n, n_vocab] alike and targets [n]")
    lp_ref, lp = _log_softmax(ref_logits), _log_softmax(logits)
    kld = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=1)
    kld = np.maximum(kld, 0.0)  # rounding can leave -1e-17 for identical rows
    rows = np.arange(targets.shape[0])
    nll_ref, nll = -lp_ref[rows, targets], -lp[rows, targets]
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return {
        "kld_mean": float(kld.mean()),
        "kld_median": float(np.median(kld)),
        "kld_p99": percentile(kld, 0.99),
        "kld_max": float(kld.max()),
        "top1": float((ref_logits.argmax(axis=1) == logits.argmax(axis=1)).mean()),
        "dp_mean": float(dp.mean()),
        "dp_rms": float(np.sqrt((dp**2).mean())),
        "ppl_ratio": float(np.exp(nll.mean() - nll_ref.mean())),
    }


# ---------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One way of storing a state: a pipeline written as a .nxkv file, or a baseline."""

    name: str
    kind: str  # "preset", "ablation", "variant" or "baseline"
    pipeline: Optional[Pipeline] = None
    baseline: Optional[Baseline] = None
    bit_profile: Any = "auto"  # save_state's: "auto" (the model's, where there is one) or None


@dataclass
class _Stored:
    n_bytes: int
    seconds: dict[str, float]
    path: Optional[str] = None  # .nxkv candidates
    payload: Optional[bytes] = None  # baselines


def candidates(presets: Sequence[str], ablate: Sequence[str], baselines: bool, head_dims: tuple[int, int],
               variants: Sequence[Pipeline] = ()) -> list[Candidate]:
    """raw first (it is also the recall reference), then the baselines, presets, ablations and
    variants (pipelines built by hand, named by their `preset`)."""
    out = [Candidate("raw", "baseline", baseline=RawBaseline("raw", True))]
    if baselines:
        out += [Candidate(b.name, "baseline", baseline=b) for b in default_baselines(*head_dims) if b.name != "raw"]
    out += [Candidate(p, "preset", pipeline=build_pipeline(p)) for p in presets]
    for p in ablate:
        out += [Candidate(pl.preset, "ablation", pipeline=pl) for pl in ablations(p)]
        if build_pipeline(p).takes_bit_profile:
            # every layer at the preset's bits, whether or not the model has a bit profile
            out.append(Candidate(f"{p}-no-profile", "ablation", pipeline=build_pipeline(p), bit_profile=None))
        if build_pipeline(p).uses_importance:
            # one step for every cell (importance-aware steps are an option of the lattice, not a stage)
            uniform = build_pipeline(p, lattice_token_steps=0.0)
            out.append(Candidate(f"{p}-no-steps", "ablation",
                                 pipeline=Pipeline(uniform.stages, f"{p}-no-steps", uniform.eviction, uniform.scoring)))
        if any(getattr(s, "rdo", 0.0) for s in build_pipeline(p).stages):
            # every group at its nearest lattice point (rate-distortion quantization is an option of the lattice)
            nearest = build_pipeline(p, lattice_rdo=0.0)
            out.append(Candidate(f"{p}-no-rdo", "ablation",
                                 pipeline=Pipeline(nearest.stages, f"{p}-no-rdo", nearest.eviction, nearest.scoring)))
        if any(getattr(s, "basis_prune", 0.0) for s in build_pipeline(p).stages):
            # every basis row stored (leaving weak components out is an option of the lattice)
            whole = build_pipeline(p, lattice_basis_prune=0.0)
            out.append(Candidate(f"{p}-no-prune", "ablation",
                                 pipeline=Pipeline(whole.stages, f"{p}-no-prune", whole.eviction, whole.scoring)))
    out += [Candidate(pl.preset, "variant", pipeline=pl) for pl in variants]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate names repeat: {names}")
    return out


class _Bench:
    """One Llama and a scratch directory, shared by every measurement of a run."""

    def __init__(self, llm, workdir: str):
        self.llm = llm
        self.workdir = workdir
        self.facts = bridge.model_facts(llm)
        self.layout = self.facts.state_layout()

    def prefill(self, tokens: Sequence[int], progress=None) -> float:
        self.llm.reset()
        bridge.clear_seq(self.llm, 0)
        t = time.perf_counter()
        bridge.prefill(self.llm, tokens, progress)
        return time.perf_counter() - t

    def store(self, cand: Candidate, blob: bytes, state_get_seconds: float) -> _Stored:
        """Store the Llama's current state (its raw blob is `blob`) with `cand`."""
        if cand.pipeline is not None:
            path = os.path.join(self.workdir, cand.name.replace("/", "_") + ".nxkv")
            report = save_state(self.llm, path, cand.pipeline, bit_profile=cand.bit_profile)
            return _Stored(report.file_bytes, dict(report.seconds), path=path)
        t = time.perf_counter()
        payload = cand.baseline.encode(blob, self.layout)
        return _Stored(len(payload), {"state_get": state_get_seconds, "encode": time.perf_counter() - t}, payload=payload)

    def restore(self, cand: Candidate, stored: _Stored, raw_state, tokens: Sequence[int]) -> dict[str, float]:
        """Put the candidate's state into sequence 0, as a user would."""
        bridge.clear_seq(self.llm, 0)
        if stored.path is not None:
            return dict(load_state(self.llm, stored.path).seconds)
        t0 = time.perf_counter()
        blob = cand.baseline.decode(stored.payload, raw_state, self.layout)
        t1 = time.perf_counter()
        if not bridge.set_seq_state(self.llm, blob, 0):
            raise NxkvError(f"llama.cpp refused the state restored by baseline {cand.name}")
        bridge.set_prompt(self.llm, np.asarray(tokens, np.int32), None)
        return {"read": 0.0, "decode": t1 - t0, "llama_set": time.perf_counter() - t1}

    def store_all(self, cands: Sequence[Candidate]) -> tuple[bytes, object, dict[str, _Stored]]:
        t = time.perf_counter()
        blob = bridge.get_seq_state(self.llm, 0)
        state_get = time.perf_counter() - t
        raw_state = parse_state(blob, "sequence", self.layout)
        return blob, raw_state, {c.name: self.store(c, blob, state_get) for c in cands}

    def greedy(self, prompt: Sequence[int], start_pos: int, n_new: int) -> list[int]:
        logits = bridge.eval_logits(self.llm, prompt, start_pos)[-1]
        out = []
        for i in range(n_new):
            out.append(int(logits.argmax()))
            logits = bridge.eval_logits(self.llm, out[-1:], start_pos + len(prompt) + i)[-1]
        return out


# ---------------------------------------------------------------- pass-key recall


def pass_key_document(llm, text_tokens: Sequence[int], n_tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """(tokens of a document of about n_tokens whose text hides a 5-digit key at a random
    line, the key). The haystack is the evaluated text itself."""
    key = rng.randrange(10000, 100000)
    needle = PASS_KEY_NEEDLE.format(key=key)
    overhead = len(llm.tokenize((PASS_KEY_INTRO + needle + "\n").encode(), add_bos=True))
    if n_tokens - overhead < 16 or len(text_tokens) < n_tokens - overhead + 1:
        raise ConfigError(f"a {n_tokens}-token pass-key document needs a longer text")
    body = llm.detokenize(list(text_tokens[1 : n_tokens - overhead])).decode("utf-8", errors="ignore")
    lines = body.split("\n")
    at = rng.randrange(0, len(lines) + 1)
    doc = PASS_KEY_INTRO + "\n".join(lines[:at] + [needle] + lines[at:])
    return llm.tokenize(doc.encode(), add_bos=True), key


def recall(bench: _Bench, cands: Sequence[Candidate], text_tokens, n_tokens: int, trials: int, seed: int,
           log: Callable[[str], None]) -> dict[str, int]:
    """Hits per candidate over `trials` pass-key documents of about n_tokens."""
    llm = bench.llm
    rng = random.Random(seed)
    question = llm.tokenize(PASS_KEY_QUESTION.encode(), add_bos=False)
    hits = {c.name: 0 for c in cands}
    for trial in range(trials):
        doc, key = pass_key_document(llm, text_tokens, n_tokens, rng)
        bench.prefill(doc)
        _, raw_state, stored = bench.store_all(cands)
        got = []
        for c in cands:
            bench.restore(c, stored[c.name], raw_state, doc)
            answer = llm.detokenize(bench.greedy(question, len(doc), PASS_KEY_ANSWER_TOKENS)).decode("utf-8", "replace")
            if str(key) in answer:
                hits[c.name] += 1
                got.append(c.name)
            bridge.clear_seq(llm, 0)
        log(f"  recall trial {trial + 1}/{trials} ({len(doc)} tokens): {len(got)}/{len(cands)} candidates found the key")
    return hits


# ---------------------------------------------------------------- the run


def context_needed(prefix_tokens: Sequence[int], eval_tokens: int) -> int:
    """n_ctx an eval needs: the longest prefix plus its continuation, or plus the pass-key
    question and answer (with room for the document's retokenization)."""
    return max(prefix_tokens) + max(eval_tokens + 1, 64)


def evaluate(
    llm,
    text: str,
    *,
    text_name: str = "text",
    presets: Sequence[str] = ("lossless",),
    prefix_tokens: Sequence[int] = (1024,),
    eval_tokens: int = 256,
    baselines: bool = True,
    ablate: Sequence[str] = (),
    variants: Sequence[Pipeline] = (),
    variant_prefixes: Optional[Sequence[int]] = None,
    recall_trials: int = 4,
    recall_prefixes: Optional[Sequence[int]] = None,
    seed: int = 0,
    progress_factory: Optional[Callable[[str], Callable[[int, int], None]]] = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Rows of figures, one per prefix length and candidate (see the module docstring). `llm`
    needs n_ctx >= context_needed(prefix_tokens, eval_tokens); recall runs at the prefix lengths in
    recall_prefixes (default: all); `variants` (pipelines named by their preset) are measured
    at variant_prefixes (default: all)."""
    if eval_tokens < 1 or not prefix_tokens or min(prefix_tokens) < 1:
        raise ConfigError("eval needs at least one prefix and one evaluated token")
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
    longest = max(prefix_tokens) + eval_tokens + 1
    if len(tokens) < longest:
        raise ConfigError(f"{text_name} has {len(tokens)} tokens; prefix {max(prefix_tokens)} + {eval_tokens} evaluated needs {longest}")
    if llm.n_ctx() < context_needed(prefix_tokens, eval_tokens):
        raise ConfigError(f"the Llama's context ({llm.n_ctx()}) is too small: eval needs {context_needed(prefix_tokens, eval_tokens)}")
    facts = bridge.model_facts(llm)
    head_dims = (facts.n_embd_head_k, facts.n_embd_head_v)
    all_cands = candidates(presets, ablate, baselines, head_dims, variants)
    fixed = [c for c in all_cands if c.kind != "variant"]
    recall_at = set(prefix_tokens if recall_prefixes is None else recall_prefixes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nexus-gguf-eval-") as workdir:
        bench = _Bench(llm, workdir)
        for n in prefix_tokens:
            cands = all_cands if variant_prefixes is None or n in variant_prefixes else fixed
            progress = progress_factory(f"prefill {n}") if progress_factory else None
            prefill_seconds = bench.prefill(tokens[:n], progress)
            raw_blob, raw_state, stored = bench.store_all(cands)
            cont, targets = tokens[n : n + eval_tokens], np.asarray(tokens[n + 1 : n + eval_tokens + 1])
            bridge.clear_seq(llm, 0)
            if not bridge.set_seq_state(llm, raw_blob, 0):
                raise NxkvError("llama.cpp refused its own raw state")
            ref = bridge.eval_logits(llm, cont, n)
            for c in cands:
                load = bench.restore(c, stored[c.name], raw_state, tokens[:n])
                metrics = continuation_metrics(ref, bridge.eval_logits(llm, cont, n), targets)
                save = stored[c.name].seconds
                rows.append({
                    "name": c.name,
                    "kind": c.kind,
                    "text": text_name,
                    "model": facts.file_name,
                    "prefix_tokens": n,
                    "eval_tokens": eval_tokens,
                    "raw_bytes": len(raw_blob),
                    "stored_bytes": stored[c.name].n_bytes,
                    "ratio": len(raw_blob) / stored[c.name].n_bytes,
                    **metrics,
                    "save_seconds": sum(save.values()),
                    "save_scoring_seconds": save.get("scoring", 0.0),
                    "save_encode_seconds": save.get("encode", 0.0),
                    "load_seconds": sum(load.values()),
                    "load_read_seconds": load["read"],
                    "load_decode_seconds": load["decode"],
                    "load_set_seconds": load["llama_set"],
                    "prefill_seconds": prefill_seconds,
                    "recall_hits": None,
                    "recall_trials": None,
                })
                log(f"  {c.name}: ratio {rows[-1]['ratio']:.2f}x, mean KLD {metrics['kld_mean']:.5f}")
            bridge.clear_seq(llm, 0)
            del raw_blob, raw_state, stored
            if recall_trials > 0 and n in recall_at:
                hits = recall(bench, cands, tokens, n, recall_trials, seed + n, log)
                for r in rows[-len(cands):]:
                    r["recall_hits"], r["recall_trials"] = hits[r["name"]], recall_trials
        llm.reset()
        bridge.clear_seq(llm, 0)
    return rows
