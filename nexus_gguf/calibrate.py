"""Measuring a model's bit profile (bit_profile.py): how much its output moves when one layer's K
or V is coded a bit coarser than the rest.

On a text the user chooses, the first `n_tokens` tokens are evaluated and their state stored with
the preset as it is, then once more per section with that section alone `coarser` bits coarser;
each file is restored and the next `eval_tokens` tokens' distributions are compared with those
after the raw state (mean KLD, as evaluate.py). A section's sensitivity is what its coarser file
adds to the KLD of the plain one. 2 n_layer + 1 saves and restores: about two minutes for
SmolLM2-135M at 1024 tokens on two cores. The profile depends on the model far more than on the text: one
measured at 1024 tokens of a story sets the bits of 4096-token prose and code states of texts
it never saw as well as one measured on them (README)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from . import llama_bridge as bridge
from .api import load_state, save_state
from .bit_profile import MAX_OFFSET, BitProfile, offsets
from .errors import ConfigError, NxkvError
from .evaluate import continuation_metrics
from .pipeline import DEFAULT_PRESET, build_pipeline

MEASURABLE_KLD = 1e-6  # below it a difference of two KLDs is float noise, not the cache


def calibrate(llm, text: str, *, n_tokens: int = 1024, eval_tokens: int = 200, preset: str = DEFAULT_PRESET,
              coarser: float = 1.0, text_name: str = "text",
              progress: Optional[Callable[[int, int], None]] = None) -> BitProfile:
    """The bit profile of `llm`'s model, measured on `text` (see the module docstring). `llm`
    needs n_ctx >= n_tokens + eval_tokens; its sequence 0 is overwritten."""
    if not 0 < coarser <= MAX_OFFSET:
        raise ConfigError(f"calibrate: coarser must lie in (0, {MAX_OFFSET}] bits")
    pipeline = build_pipeline(preset)
    if not pipeline.takes_bit_profile:
        raise ConfigError(f"calibrate: preset {preset!r} has no stage whose bits a profile moves")
    if n_tokens < 16 or eval_tokens < 8:
        raise ConfigError("calibrate: at least 16 prompt tokens and 8 evaluated ones")
    tokens = bridge.tokenize(llm, text, add_bos=True)
    if len(tokens) < n_tokens + eval_tokens + 1:
        raise ConfigError(f"{text_name} has {len(tokens)} tokens; {n_tokens} + {eval_tokens} evaluated need "
                          f"{n_tokens + eval_tokens + 1} (a longer text, or fewer --tokens)")
    if llm.n_ctx() < n_tokens + eval_tokens:
        raise ConfigError(f"the Llama's context ({llm.n_ctx()}) is too small: calibrating needs {n_tokens + eval_tokens}")
    facts = bridge.model_facts(llm)
    prompt = np.asarray(tokens[:n_tokens], np.int32)
    cont, targets = tokens[n_tokens:n_tokens + eval_tokens], np.asarray(tokens[n_tokens + 1:n_tokens + eval_tokens + 1])
    started = time.time()
    llm.reset()
    bridge.clear_seq(llm, 0)
    bridge.prefill(llm, tokens[:n_tokens])
    logits = bridge.last_logits(llm)
    raw = bytes(bridge.get_seq_state(llm, 0))
    ref = bridge.eval_logits(llm, cont, n_tokens)
    zeros = (0.0,) * facts.n_layer
    sections = [(kind, layer) for layer in range(facts.n_layer) for kind in "kv"]
    with tempfile.TemporaryDirectory(prefix="nexus-gguf-calibrate-") as workdir:
        path = os.path.join(workdir, "state.nxkv")

        def kld(profile: Optional[BitProfile]) -> float:
            bridge.clear_seq(llm, 0)
            if not bridge.set_seq_state(llm, raw, 0):
                raise NxkvError("llama.cpp refused its own raw state")
            bridge.set_prompt(llm, prompt, logits)
            save_state(llm, path, pipeline, bit_profile=profile)
            bridge.clear_seq(llm, 0)
            load_state(llm, path)
            return continuation_metrics(ref, bridge.eval_logits(llm, cont, n_tokens), targets)["kld_mean"]

        base = kld(None)
        added = []
        for i, (kind, layer) in enumerate(sections):
            bits = {"k": list(zeros), "v": list(zeros)}
            bits[kind][layer] = -coarser
            one = BitProfile(facts.fingerprint, facts.name, tuple(bits["k"]), tuple(bits["v"]))
            added.append(kld(one) - base)
            if progress is not None:
                progress(i + 1, len(sections))
    bridge.clear_seq(llm, 0)
    llm.reset()
    if not max(added) > MEASURABLE_KLD:
        # a random-weight model's output barely depends on its cache: offsets from noise
        raise NxkvError(f"calibrate: no section moved the KLD by more than {MEASURABLE_KLD:g} when coded {coarser:g} "
                        f"bits coarser (base KLD {base:.3g}): nothing to measure a profile from on this model and text")
    offs = offsets(added)
    source = {"text": text_name, "n_tokens": n_tokens, "eval_tokens": eval_tokens, "preset": preset,
              "coarser_bits": coarser, "base_kld": base, "kld_added": {f"{k}{l}": a for (k, l), a in zip(sections, added)},
              "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d")}
    return BitProfile(facts.fingerprint, facts.name or facts.file_name, tuple(offs[0::2]), tuple(offs[1::2]), source)
