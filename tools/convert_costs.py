#!/usr/bin/env python3
"""What restoring a state into another cache type costs (load_state's conversion), measured as
llama-perplexity --kl-divergence would: the next tokens after the converted restore against the
same context reading the prompt itself, and, for scale, that context against an f16 one.

    python tools/convert_costs.py [TEXT] [--prefix 1024] [--eval 128]

Prints one row per target cache: KLD of a `lossless` file converted, of a `high` file converted,
and of the target cache type itself (reading the prompt directly) against f16."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {  # name -> Llama keyword arguments (ggml type ids: q8_0 8, q5_0 6, q4_0 2)
    "f16, flash attention": dict(flash_attn=True),
    "q8_0": dict(flash_attn=True, type_k=8, type_v=8),
    "q5_0": dict(flash_attn=True, type_k=6, type_v=6),
    "q4_0": dict(flash_attn=True, type_k=2, type_v=2),
}


def main() -> int:
    import llama_cpp

    import nexus_gguf as ng
    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf.default_model import default_model_path
    from nexus_gguf.evaluate import continuation_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", nargs="?", default=os.path.join(ROOT, "tests/data/prose_long.txt"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--eval", type=int, default=128)
    args = ap.parse_args()
    model = args.model or default_model_path()
    n, e = args.prefix, args.eval

    def llama(**kw):
        return llama_cpp.Llama(model, n_ctx=n + e + 8, n_threads=os.cpu_count(), n_batch=512, verbose=False, **kw)

    src = llama(flash_attn=False)  # saved from f16 with V transposed
    tokens = src.tokenize(open(args.text, encoding="utf-8").read().encode(), add_bos=True)[: n + e + 1]
    src.eval(tokens[:n])
    targets = np.asarray(tokens[n + 1 : n + e + 1])
    with tempfile.TemporaryDirectory() as tmp:
        files = {p: os.path.join(tmp, p + ".nxkv") for p in ("lossless", "high")}
        for p, path in files.items():
            ng.save_state(src, path, p)
        base = bridge.eval_logits(src, tokens[n : n + e], n)
        print(f"{os.path.basename(model)}, {os.path.basename(args.text)}: {n}-token prefix saved from f16 (V transposed), "
              f"{e} tokens evaluated; mean KLD")
        print(f"{'restored into':<22} {'lossless file':>14} {'high file':>10} {'the cache type itself':>22}")
        for name, kw in TARGETS.items():
            direct = llama(**kw)
            direct.eval(tokens[:n])
            ref = bridge.eval_logits(direct, tokens[n : n + e], n)
            row = []
            for path in files.values():
                llm = llama(**kw)
                assert ng.load_state(llm, path).converted
                row.append(continuation_metrics(ref, bridge.eval_logits(llm, tokens[n : n + e], n), targets)["kld_mean"])
            row.append(continuation_metrics(base, ref, targets)["kld_mean"])
            print(f"{name:<22} {row[0]:>14.5f} {row[1]:>10.5f} {row[2]:>22.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
