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
K/V bytes (llama.cpp's state upload copies them so). Then the whole state encoded with the
file's stages on the CPU and on the GPU (cuda_encode.py), the same bytes checked.
Figures are medians; throughputs are decoded f16 K/V bytes per second."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from bench import _median_time  # noqa: E402  (tools/bench.py: the same medians)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state", help="a lattice-coded .nxkv file")
    ap.add_argument("--chunks", default="0,65536,32768,16384,4096", help="entropy chunk sizes to re-encode with (0: as stored)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from nexus_gguf import backends, section_decode, state_file
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
    types = {L[f"{p}_type"] for c in layout["caches"] for s in c["streams"] if s for L in s["layers"] for p in "kv"}
    why = section_decode.unsupported(pipeline, layout.get("values") or {}, types)
    if why is not None:
        print(f"{args.state}: the GPU does not decode this file ({why})", file=sys.stderr)
        return 2
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
                prep = section_decode.prepare(pp, work)
                t_prep = time.perf_counter() - t
                timings.append({"prepare (host)": t_prep * 1e3, **section_decode.run(prep)})

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

    configs = [dict(c) for c in pipeline.get_config()["stages"]]
    preset_pipeline = Pipeline.from_config({"stages": configs})
    out["encode"] = enc = _encode(raw_state, preset_pipeline, layout["values"], types, max(3, args.repeat // 2), kv_bytes)
    print("\n| chunk | K/V bytes | CPU decode ms | GPU decode ms (end to end) | GPU kernels ms | kernel GB/s | x copy | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["phases_ms"]["tables"] + r["phases_ms"]["rans"] + r["phases_ms"]["values"]
        print(f"| {r['chunk'] or 'stored'} | {r['kv_section_bytes'] / 1e6:.2f} MB | {r['cpu_decode_s'] * 1e3:.1f} | "
              f"{r['gpu_decode_s'] * 1e3:.1f} | {k:.2f} | {r['kernel_gbs']:.0f} | {r['kernel_gbs'] / d2d_gbs:.2f} | {r['bit_identical']} |")
    print(f"\ncopies of {kv_bytes / 1e6:.1f} MB: device-to-device {copies['d2d_ms']:.3f} ms, upload {copies['h2d_ms']:.2f} ms "
          f"(pageable), {copies['h2d_pinned_ms']:.2f} ms (pinned)")
    gpu_enc = (f"GPU {enc['gpu_encode_s'] * 1e3:.0f} ms ({enc['gpu_mbs']:.0f} MB/s) end to end; same bytes {enc['bit_identical']}"
               if "gpu_encode_s" in enc else f"the GPU does not encode them ({enc['gpu_unsupported']})")
    print(f"encode (the file's stages, whole state): CPU {enc['cpu_encode_s'] * 1e3:.0f} ms ({enc['cpu_mbs']:.0f} MB/s), {gpu_enc}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if all(r["bit_identical"] for r in rows) and enc["bit_identical"] else 1


def _layout_of(layout):
    from nexus_gguf.llama_state import StateLayout

    first = [next(st for st in c["streams"] if st) for c in layout["caches"]]
    return StateLayout(bool(layout["has_cell_ext"]), [[L["model_layer"] for L in st["layers"]] for st in first],
                       [bool(st["layers"][0]["sliding_window"]) for st in first])


def _encode(raw_state, pipeline, dims, types: set, repeat: int, kv_bytes: int) -> dict:
    """The preset's encode of the whole state on the CPU and on the GPU (cuda_encode.py), same
    bytes checked; MB/s of raw K/V. Where the GPU does not encode these stages, the CPU's alone
    and the reason."""
    from nexus_gguf import state_file
    from nexus_gguf.cuda_encode import encode_sections, unsupported

    def cpu():
        return state_file.encode_state(raw_state, pipeline, dims)[1]

    def gpu():
        saved = state_file._gpu_encoder
        state_file._gpu_encoder = lambda: encode_sections
        try:
            return state_file.encode_state(raw_state, pipeline, dims)[1]
        finally:
            state_file._gpu_encoder = saved

    why = unsupported(pipeline, dims, types)
    if why is not None:
        cpu_s = _median_time(cpu, repeat)
        return {"cpu_encode_s": cpu_s, "cpu_mbs": kv_bytes / cpu_s / 1e6, "gpu_unsupported": why, "bit_identical": True}
    want, got = cpu(), gpu()
    same = [n for n, _ in want] == [n for n, _ in got] and all(
        bytes(np.asarray(a)) == bytes(np.asarray(b)) for (_, a), (_, b) in zip(want, got))
    cpu_s, gpu_s = _median_time(cpu, repeat), _median_time(gpu, repeat)
    return {"cpu_encode_s": cpu_s, "gpu_encode_s": gpu_s, "cpu_mbs": kv_bytes / cpu_s / 1e6, "gpu_mbs": kv_bytes / gpu_s / 1e6,
            "bit_identical": same}


if __name__ == "__main__":
    sys.exit(main())
