#!/usr/bin/env python3
"""GPU throughput of the CUDA library, against baselines measured in the same run.

    python tools/gpu_bench.py STATE.nxkv [--chunks 0,16384,4096] [--repeat 7] [--json OUT]

For a lattice-coded state file (tools/bench.py or `nexus-gguf save-state` writes one; no model is
needed): the file re-encoded with its own stages at each entropy chunk size (0: the file as it
is; smaller chunks give the GPU more independent rANS lanes for a few more bytes), then per
variant: the CPU decode (this machine's cores, native backend), the GPU decode end to end
(decode_state_blob with NEXUS_GGUF_BACKEND=cuda: host parsing, upload, kernels, rows copied into
the state buffer) and the library's own phase times (CUDA events), checked bit-identical to the
CPU's rows. Baselines: the device-to-device copy and the host-to-device upload of the decoded
K/V bytes (llama.cpp's state upload copies them so). Then the per-op encode kernels (RoPE
removal, Hadamard, E8 quantization, rANS encode) on the same state's values, kernel time only.
Figures are medians; throughputs are decoded f16 K/V bytes per second."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state", help="a lattice-coded .nxkv file")
    ap.add_argument("--chunks", default="0,65536,32768,16384,4096", help="entropy chunk sizes to re-encode with (0: as stored)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from nexus_gguf import backends, cuda_decode, state_file
    from nexus_gguf.backends import cuda
    from nexus_gguf.format import NxkvFile
    from nexus_gguf.header import Header
    from nexus_gguf.llama_state import parse_state
    from nexus_gguf.pipeline import Pipeline

    name, major, minor = cuda.device()
    f = NxkvFile.open(args.state)
    h = Header(f.header, args.state)
    limits = h.limits()
    sections = {n: bytes(f.section(n)) for n in f.names()}
    layout, pipeline = h.state, h.pipeline
    blob, state0 = state_file.decode_state_blob(layout, pipeline, sections.__getitem__, limits)
    kv_bytes = sum(L.k.nbytes + L.v.nbytes for _, _, L in state0.layers())
    out = {"device": f"{name} (sm_{major}{minor})", "file": os.path.basename(args.state), "kv_bytes": kv_bytes,
           "cpu_threads": backends.threads(), "variants": []}
    copies = cuda.copy_times(kv_bytes, 20)
    out["copies_ms"] = copies
    d2d_gbs = kv_bytes / copies["d2d_ms"] / 1e6
    print(f"device {out['device']}; state {args.state}: {kv_bytes / 1e6:.1f} MB of K/V rows; "
          f"copy baselines: device-to-device {d2d_gbs:.0f} GB/s (bytes copied), upload pageable "
          f"{kv_bytes / copies['h2d_ms'] / 1e6:.1f} GB/s, pinned {kv_bytes / copies['h2d_pinned_ms'] / 1e6:.1f} GB/s", flush=True)

    raw_state = parse_state(bytes(blob), layout["kind"], _layout_of(layout))
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        if chunk:
            configs = [dict(c) for c in pipeline.get_config()["stages"]]
            for c in configs:
                if c["id"] == "entropy":
                    c["chunk"] = chunk
            p = Pipeline.from_config({"stages": configs})
            lay, secs = state_file.encode_state(raw_state, p, layout["values"])
            data = {n: bytes(np.ascontiguousarray(v).tobytes()) for n, v in secs}
            data.update({n: sections[n] for n in sections if n not in data})
        else:
            p, lay, data = pipeline, layout, sections
        size = sum(len(v) for k, v in data.items() if k[:2] in ("k.", "v."))
        cpu_blob, _ = state_file.decode_state_blob(lay, p, data.__getitem__, limits)
        cpu_s = _median_time(lambda: state_file.decode_state_blob(lay, p, data.__getitem__, limits), args.repeat)
        timings = []

        def gpu():
            def decoder(pp, work):
                t = time.perf_counter()
                prep = cuda_decode.prepare(pp, work)
                t_prep = time.perf_counter() - t
                timings.append({"prepare (host)": t_prep * 1e3, **cuda_decode.run(prep)})

            saved = state_file._gpu_decoder
            state_file._gpu_decoder = lambda: decoder
            try:
                return state_file.decode_state_blob(lay, p, data.__getitem__, limits)[0]
            finally:
                state_file._gpu_decoder = saved

        gpu_blob = gpu()
        same = bytes(gpu_blob) == bytes(cpu_blob)
        timings.clear()
        gpu_s = _median_time(gpu, args.repeat)
        phase = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
        kernels_ms = phase["tables"] + phase["rans"] + phase["values"]
        row = {"chunk": chunk, "kv_section_bytes": size, "cpu_decode_s": cpu_s, "gpu_decode_s": gpu_s, "phases_ms": phase,
               "kernel_gbs": kv_bytes / kernels_ms / 1e6, "bit_identical": same}
        out["variants"].append(row)
        rows.append(row)
        print(f"chunk {chunk or 'as stored'}: {size / 1e6:.2f} MB; CPU decode {cpu_s * 1e3:.1f} ms, GPU {gpu_s * 1e3:.1f} ms "
              f"end to end; kernels {kernels_ms:.2f} ms = {row['kernel_gbs']:.0f} GB/s "
              f"({row['kernel_gbs'] / d2d_gbs:.2f} of the copy); phases {json.dumps({k: round(v, 2) for k, v in phase.items()})}; "
              f"bit-identical {same}", flush=True)

    out["encode_kernels"] = _encode_kernels(state0, pipeline, layout["values"], cuda, kv_bytes)
    print("\n| chunk | K/V bytes | CPU decode ms | GPU decode ms (end to end) | GPU kernels ms | kernel GB/s | x copy | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["phases_ms"]["tables"] + r["phases_ms"]["rans"] + r["phases_ms"]["values"]
        print(f"| {r['chunk'] or 'stored'} | {r['kv_section_bytes'] / 1e6:.2f} MB | {r['cpu_decode_s'] * 1e3:.1f} | "
              f"{r['gpu_decode_s'] * 1e3:.1f} | {k:.2f} | {r['kernel_gbs']:.0f} | {r['kernel_gbs'] / d2d_gbs:.2f} | {r['bit_identical']} |")
    print(f"\ncopies of {kv_bytes / 1e6:.1f} MB: device-to-device {copies['d2d_ms']:.3f} ms, upload {copies['h2d_ms']:.2f} ms "
          f"(pageable), {copies['h2d_pinned_ms']:.2f} ms (pinned)")
    enc = out["encode_kernels"]
    print("encode kernels (kernel time only, " + ", ".join(f"{k} {v:.2f} ms" for k, v in enc["ms"].items())
          + f"): {enc['gbs']:.0f} GB/s of f16 K/V")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if all(r["bit_identical"] for r in rows) else 1


def _layout_of(layout):
    from nexus_gguf.llama_state import StateLayout

    first = [next(st for st in c["streams"] if st) for c in layout["caches"]]
    return StateLayout(bool(layout["has_cell_ext"]), [[L["model_layer"] for L in st["layers"]] for st in first],
                       [bool(st["layers"][0]["sliding_window"]) for st in first])


def _encode_kernels(state, pipeline, dims, cuda, kv_bytes: int) -> dict:
    """The per-op encode kernels on every K section of the state (V skips RoPE), kernel time only
    (nxkv_cuda_last_kernel_ms), against the CPU references' outputs."""
    from nexus_gguf.backends import reference as ref
    from nexus_gguf.stages.entropy import normalized_freqs
    from nexus_gguf.stages.rope import Rope

    _, lib = cuda.load()
    rope = next((s for s in pipeline.stages if isinstance(s, Rope)), None)
    ms = {"rope": 0.0, "hadamard": 0.0, "lattice": 0.0, "rans": 0.0}
    checked = False
    for _, _, layer in state.layers():
        for kind in ("k", "v"):
            x = layer.values(kind)
            d = int(dims[f"head_dim_{kind}"])
            n = x.shape[0]
            x = x.reshape(n, -1, d)
            if kind == "k" and rope is not None and rope.mode in ("norm", "neox"):
                pos = np.arange(n)
                cos, sin = rope._trig(pos, False, -1.0)
                x = cuda.rope_rotate(x, cos, sin, rope.n_rot, rope.mode == "neox")
                ms["rope"] += lib.nxkv_cuda_last_kernel_ms()
            x = cuda.hadamard_blocks(x, d) if d & (d - 1) == 0 else x
            ms["hadamard"] += lib.nxkv_cuda_last_kernel_ms()
            groups = x.reshape(-1, 8).astype(np.float64)
            step = np.full(groups.shape[0], float(np.sqrt((groups**2).mean())) * 2.0 ** (2.047 - 3.5))
            coset, coord, last = cuda.lattice_quantize(groups, step)
            ms["lattice"] += lib.nxkv_cuda_last_kernel_ms()
            sym = coord.reshape(-1).astype(np.int64)
            lo = int(sym.min())
            freqs = normalized_freqs(np.bincount(sym - lo))
            lengths, body = cuda.rans_encode_lanes(sym - lo, freqs, 4, 4096)
            ms["rans"] += lib.nxkv_cuda_last_kernel_ms()
            if not checked:  # one section checked against the references
                assert (coset, coord, last) is not None
                want = ref.lattice_quantize(groups, step)
                assert all(np.array_equal(a, b) for a, b in zip(want, (coset, coord, last)))
                want_lengths, want_body = ref.rans_encode_lanes(sym - lo, freqs, 4, 4096)
                assert np.array_equal(want_lengths, lengths) and want_body == body
                checked = True
    total = sum(ms.values())
    return {"ms": ms, "gbs": kv_bytes / total / 1e6, "note": "coord streams only for rANS; steps from a global RMS"}


if __name__ == "__main__":
    sys.exit(main())
