"""What the sections of a .nxkv file hold: a LlamaState, its prompt tokens and last logits
turned into named sections plus the header's "state" layout, and back."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .backends import backend_name, in_pool, parallel_map, pool, prepare_and_run, threads
from .blas_threads import single_threaded_blas
from .errors import FormatError, StateLayoutError
from .ggml_types import GgmlType, ggml_type_by_name
from .header import LOGITS_DTYPES, Limits
from .heap import release_freed_memory
from .llama_rotation import llama_rotation, toggle_llama_rotation
from .llama_state import Cache, Cells, LayerKV, LlamaState, Stream, parse_cells, state_buffer
from .pipeline import Pipeline, meta_pipeline
from .stages import TensorInfo
from .stages.lattice import MAX_BASIS_DIM

# largest cell record: pos, n_seq, the 12-byte extension and this many sequence ids
_MAX_SEQ_PER_CELL = 256
_MAX_CELL_BYTES = 4 * (2 + 3 + _MAX_SEQ_PER_CELL)
_NUMPY_LOGITS = {"f32": "<f4", "f16": "<f2"}


def _meta_info(name: str, n_bytes: int) -> TensorInfo:
    return TensorInfo(name, "raw", 0, n_bytes)


def value_dims(head_dim_k: int, head_dim_v: int) -> dict[str, int]:
    """What the value path needs to know about a model's cache rows: head sizes, and the
    Hadamard block llama.cpp rotated the rows of a quantized cache with (0: none)."""
    return {
        "head_dim_k": head_dim_k,
        "head_dim_v": head_dim_v,
        "llama_rot_k": llama_rotation(head_dim_k, "k"),
        "llama_rot_v": llama_rotation(head_dim_v, "v"),
    }


def _value_info(pipeline: Pipeline, name: str, kind: str, t: GgmlType, cells: Cells, layer_model, sliding: bool,
                n_embd: int, dims, importance: Optional[np.ndarray] = None, queries: Optional[dict] = None) -> TensorInfo:
    """The TensorInfo of a K or V section on the value path; llama_rot is set when a stage
    absorbs llama.cpp's rotation of these rows (they then stay rotated, see
    Pipeline.absorbs_rotation)."""
    head_dim = dims[f"head_dim_{kind}"]
    if head_dim <= 0 or n_embd % head_dim:
        raise StateLayoutError(f"{name}: rows of {n_embd} values are not whole heads of {head_dim}")
    # symbol streams hold at most one value per cache value, whatever the cache type's size, or
    # the lattice's PCA bases: w x w per vector of w values (a head, or a head group of at most
    # MAX_BASIS_DIM values)
    vector = max(head_dim, min(n_embd, MAX_BASIS_DIM))
    info = TensorInfo(name, t.name, t.float_bytes, max(len(cells), vector) * n_embd, kind=kind, positions=cells.pos,
                      model_layer=layer_model, sliding=sliding, n_cells=len(cells), n_heads=n_embd // head_dim,
                      head_dim=head_dim, importance=importance,
                      query_energy=queries.get(layer_model) if queries is not None and kind == "k" else None)
    block = dims[f"llama_rot_{kind}"] if not t.float_bytes else 0
    return replace(info, llama_rot=block) if pipeline.absorbs_rotation(info, block) else info


def _unrotated(values: np.ndarray, t: GgmlType, info: TensorInfo, dims) -> np.ndarray:
    """Undo (or redo) llama.cpp's rotation of a quantized cache's rows, unless a stage absorbs it."""
    return values if info.llama_rot else toggle_llama_rotation(values, t, dims[f"llama_rot_{info.kind}"])


def encode_state(state: LlamaState, pipeline: Pipeline, dims: Optional[dict[str, int]] = None,
                 importance: Optional[np.ndarray] = None, queries: Optional[dict] = None
                 ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """(layout for the header, sections) of a parsed state. The value path needs `dims`
    (value_dims of the model); stages that code cells by importance get it from `importance`
    (float64 [n_cells] of the first cache's stream, the same for every layer: scoring.py), and
    those that weight K by the queries from `queries` (model layer -> float64 [n_kv, head_dim]:
    scoring.query_energy)."""
    layout, sections = iter_encode_state(state, pipeline, dims, importance, queries=queries)
    return layout, list(sections)


def iter_encode_state(state: LlamaState, pipeline: Pipeline, dims: Optional[dict[str, int]] = None,
                      importance: Optional[np.ndarray] = None, queries: Optional[dict] = None,
                      done_with: Optional[Callable[[np.ndarray], int]] = None, memory_budget: Optional[int] = None
                      ) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """encode_state, with the sections made as they are asked for: layers encode on all cores
    a few at a time, so memory holds those layers' sections, not the whole file's. done_with:
    called (on the encoding threads) with each layer's K and V rows once nothing reads them any
    more (the state's memory can then be let go of, section by section), returns the bytes it
    gave back.
    memory_budget: bytes the layers being encoded may hold at once, with what done_with gave
    back added as it comes (as many layers at a time as that holds, at least one)."""
    if pipeline.values_path and not dims:
        raise StateLayoutError("the lossy stages need the model's head sizes")
    caches = []
    for cache in state.caches:
        streams = []
        for s in cache.streams:
            if s is None:
                streams.append(None)
                continue
            layers = [{
                "model_layer": layer.model_layer,
                "sliding_window": layer.sliding_window,
                "k_type": layer.k_type.name,
                "k_shape": list(layer.k.shape),
                "v_type": layer.v_type.name,
                "v_shape": list(layer.v.shape),
            } for layer in s.layers]
            streams.append({"n_cells": len(s.cells), "cell_bytes": len(s.cells.to_bytes()), "v_trans": s.v_trans,
                            "layers": layers})
        caches.append({"name": cache.name, "streams": streams})
    layout = {
        "kind": state.kind,
        "arch": state.arch,
        "seq_id": state.seq_id,
        "has_cell_ext": state.has_cell_ext,
        "caches": caches,
    }
    if pipeline.values_path:
        layout["values"] = dict(dims)
    return layout, _sections(state, pipeline, dims, importance, queries, done_with, memory_budget)


def _gpu_encoder():
    """cuda_encode.encode_sections where the cuda backend is chosen, else None."""
    if backend_name() != "cuda":
        return None
    from . import cuda_encode

    return cuda_encode.encode_sections


def _encode_on_gpu(encode, pipeline: Pipeline, dims, ci: int, si: int, s: Stream, importance) -> Optional[list]:
    """The stream's K/V sections, every layer in one GPU batch (cuda_encode.py), in the CPU
    path's order; None where they need the CPU path."""
    from . import cuda_encode

    types = {t.name for layer in s.layers for t in (layer.k_type, layer.v_type)}
    if cuda_encode.unsupported(pipeline, dims, types) is not None:
        return None
    jobs = []
    for layer in s.layers:
        for kind, t, rows in (("k", layer.k_type, layer.k), ("v", layer.v_type, layer.v)):
            name = f"{kind}.{ci}.{si}.{layer.cache_layer}"
            info = _value_info(pipeline, name, kind, t, s.cells, layer.model_layer, layer.sliding_window, layer.n_embd(kind),
                               dims, importance if ci == 0 else None)
            jobs.append(cuda_encode.EncodeJob(name, info, np.ascontiguousarray(rows), t.name == "f16", kind == "v" and layer.v_trans))
    return encode(pipeline, jobs)


# what a layer being encoded holds at its peak, in multiples of its K and V rows, rounded up
# (SmolLM2 f16, 7680 cells: 5.9 MB of rows; a save's resident memory rose 42 MB with one layer
# in flight, 7x its rows, and 13-19 MB more with a second core's: the values as float32, their
# float64 working copy, the points, what the allocator keeps; tracemalloc in test_heap.py)
LAYER_WORKING_SET = 7


def _sections(state: LlamaState, pipeline: Pipeline, dims, importance, queries, done_with,
              memory_budget) -> Iterator[tuple[str, np.ndarray]]:
    meta = meta_pipeline()
    gpu = _gpu_encoder() if pipeline.values_path else None
    for ci, cache in enumerate(state.caches):
        for si, s in enumerate(cache.streams):
            if s is None:
                continue
            cells = np.frombuffer(s.cells.to_bytes(), np.uint8)
            name = f"cells.{ci}.{si}"
            yield name, meta.encode(cells, _meta_info(name, cells.size))
            coded_on_gpu = _encode_on_gpu(gpu, pipeline, dims, ci, si, s, importance) if gpu is not None else None
            if coded_on_gpu is not None:
                yield from coded_on_gpu
                continue

            def encode_layer(layer, ci=ci, si=si, s=s) -> tuple[list, int]:
                """(the layer's sections, bytes done_with gave back): each of its K and V rows
                given back as soon as nothing reads them any more."""
                out, given = [], 0
                for kind, t in (("k", layer.k_type), ("v", layer.v_type)):
                    name = f"{kind}.{ci}.{si}.{layer.cache_layer}"
                    rows = layer.k if kind == "k" else layer.v
                    if pipeline.values_path:
                        info = _value_info(pipeline, name, kind, t, s.cells, layer.model_layer, layer.sliding_window,
                                           layer.n_embd(kind), dims, importance if ci == 0 else None, queries)
                        held = [layer.values(kind)]
                        if done_with is not None and not np.may_share_memory(held[0], rows):
                            given += done_with(rows)  # read into values of their own: not needed again
                            rows = None
                        # no reference kept here: the pipeline lets the float32 values go once
                        # it has what it makes of them
                        out.append((name, pipeline.encode_values(_unrotated(held.pop(), t, info, dims), info)))
                    else:
                        flat = np.ascontiguousarray(rows).reshape(-1)
                        out.append((name, pipeline.encode(flat, TensorInfo(name, t.name, t.float_bytes, flat.size))))
                        del flat
                    if done_with is not None and rows is not None:
                        given += done_with(rows)
                return out, given

            # layers encode on all cores (the kernels and most of numpy release the GIL), numpy's
            # BLAS on one thread meanwhile (blas_threads.py); within a memory budget, as many at
            # once as it holds with the rows given back so far
            yield from _encode_layers(encode_layer, s.layers, memory_budget)


def _encode_layers(encode_layer, layers: list, memory_budget) -> Iterator[tuple[str, np.ndarray]]:
    """The sections of encode_layer(layer) (-> (sections, bytes of rows given back)) for each
    layer, in order, the layers encoded on the pool: a layer starts as soon as one ends and the
    budget holds it, not a batch at a time (a batch's last layer left the other cores idle: a
    4096-token save's encoding used 1.7 of 2), the sections of those done kept (small) until the
    layers before them are. On an error no more start; once those running end, the first
    layer's error in order is raised. The heap's freed pages go back to the system every two
    layers per thread, or after each while the budget holds fewer layers than threads (glibc
    keeps what each thread frees)."""
    every = 2 * threads()
    if threads() < 2 or in_pool() or len(layers) < 2:
        with single_threaded_blas():
            for i, layer in enumerate(layers):
                yield from encode_layer(layer)[0]
                if (i + 1) % every == 0:
                    release_freed_memory()
        release_freed_memory()
        return
    from concurrent.futures import FIRST_COMPLETED, wait

    executor = pool()
    running: dict = {}  # future -> the layer's place
    finished: dict = {}  # place -> its future, until the layers before it are yielded
    given_back, started, next_out, failed = 0, 0, 0, False
    with single_threaded_blas():
        try:
            while next_out < len(layers):
                width = threads()
                if memory_budget is not None and started < len(layers):
                    L = layers[started]
                    cost = LAYER_WORKING_SET * (L.k.nbytes + L.v.nbytes)
                    width = max(1, min(width, (memory_budget + given_back) // max(cost, 1)))
                if width == 1 and not running and not finished:
                    # the budget holds one layer: it encodes here, as each layer did without a pool
                    # (on the pool's threads, each a heap of its own, a bounded 7680-token save peaked
                    # at +242 MB instead of +218)
                    coded, given = encode_layer(layers[started])
                    started, next_out, given_back = started + 1, next_out + 1, given_back + given
                    yield from coded
                    release_freed_memory()
                    continue
                while not failed and started < len(layers) and len(running) < width:
                    running[executor.submit(encode_layer, layers[started])] = started
                    started += 1
                if next_out not in finished:
                    for f in wait(running, return_when=FIRST_COMPLETED)[0]:
                        finished[running.pop(f)] = f
                        if f.exception() is not None:
                            failed = True
                        else:
                            given_back += f.result()[1]
                while next_out in finished:
                    coded, _ = finished.pop(next_out).result()  # (a layer's error: raised here, in order)
                    next_out += 1
                    yield from coded
                    if next_out % every == 0 or width < threads():  # (a binding budget: after each layer)
                        release_freed_memory()
        finally:
            wait(running)
    release_freed_memory()


def _shape(v, what: str, rows: int, row_bytes: int) -> tuple[int, int]:
    """A [rows, row bytes] shape from the header, each bounded before anything is allocated."""
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x for x in v)):
        raise FormatError(f"{what}: invalid shape {v!r}")
    if v[0] > rows or v[1] > row_bytes:
        raise FormatError(f"{what}: shape {v!r} is larger than the model's rows ({rows} x {row_bytes} bytes at most)")
    return v[0], v[1]


def _check_dims(dims, limits: Limits) -> None:
    if not isinstance(dims, dict):
        raise FormatError("the file's lossy pipeline has no value layout in its header")
    for kind in ("k", "v"):
        head_dim, rot = dims.get(f"head_dim_{kind}"), dims.get(f"llama_rot_{kind}")
        want = limits.head_dim_k if kind == "k" else limits.head_dim_v
        # integers, not merely equal to them: 32.0 == 32, and the decoders index with these
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (head_dim, rot))
        if not ints or head_dim != want or rot not in (0, 64, 128, 256, 512, 1024) or rot > head_dim:
            raise FormatError(f"value layout {dims!r} does not fit the model's {kind.upper()} heads of {want}")


def decode_state(layout: dict[str, Any], pipeline: Pipeline, section, limits: Limits,
                 concurrent_reads: bool = False) -> LlamaState:
    """Rebuild the LlamaState from the header layout and a `section(name) -> bytes` accessor.
    Every count and shape is checked against `limits` before it is used. concurrent_reads:
    `section` may be called from several threads at once (NxkvFile.concurrent_reads)."""
    return decode_state_blob(layout, pipeline, section, limits, concurrent_reads)[1]


def _no_rows(shape: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(np.zeros(1, np.uint8), shape)


def decode_state_blob(layout: dict[str, Any], pipeline: Pipeline, section, limits: Limits,
                      concurrent_reads: bool = False) -> tuple[np.ndarray, LlamaState]:
    """decode_state, and the llama.cpp blob it makes: decoded layer by layer straight into the
    one buffer llama.cpp will read (the state's rows are views of it), so memory holds one
    state plus a layer per core, not the rows and then their joined copy."""
    meta = meta_pipeline()
    dims = layout.get("values") if pipeline.values_path else None
    if pipeline.values_path:
        _check_dims(dims, limits)
    try:
        kind, arch, seq_id = layout["kind"], layout["arch"], layout["seq_id"]
        if kind == "sequence":
            if not isinstance(seq_id, int) or isinstance(seq_id, bool) or not 0 <= seq_id < 1 << 31:
                raise FormatError(f"a sequence state needs a sequence id, not {seq_id!r}")
        elif kind != "context" or not isinstance(arch, str) or len(arch.encode()) > 256:
            raise FormatError(f"state kind {kind!r} with architecture {arch!r} is not one llama.cpp writes")
        caches, jobs = [], []
        if not isinstance(layout["caches"], list) or not 1 <= len(layout["caches"]) <= 2:
            raise FormatError(f"a state has one or two caches, not {len(layout['caches'])!r}")
        for ci, c in enumerate(layout["caches"]):
            streams = []
            cells_in_cache = 0  # a context's streams share its n_ctx cells
            for si, s in enumerate(c["streams"][: 1 << 16]):
                if s is None:
                    streams.append(None)
                    continue
                n_cells, cell_bytes = int(s["n_cells"]), int(s["cell_bytes"])
                cells_in_cache += n_cells
                if not 0 < n_cells <= limits.n_ctx or not 0 < cell_bytes <= n_cells * _MAX_CELL_BYTES:
                    raise FormatError(f"stream {ci}.{si}: {n_cells} cells in {cell_bytes} bytes, the context holds {limits.n_ctx}")
                if cells_in_cache > limits.n_ctx:
                    raise FormatError(f"cache {ci}: its streams hold {cells_in_cache} cells or more, the context holds {limits.n_ctx}")
                if not 0 < len(s["layers"]) <= limits.n_layer:
                    raise FormatError(f"stream {ci}.{si}: {len(s['layers'])} layers, the model has {limits.n_layer}")
                name = f"cells.{ci}.{si}"
                cell_data = meta.decode(np.frombuffer(section(name), np.uint8), _meta_info(name, cell_bytes))
                cells = _cells_from_bytes(cell_data, n_cells, bool(layout["has_cell_ext"]))
                v_trans = bool(s["v_trans"])
                layers = []
                for li, L in enumerate(s["layers"]):
                    shapes = {}
                    for part in ("k", "v"):
                        name = f"{part}.{ci}.{si}.{li}"
                        t = ggml_type_by_name(L[f"{part}_type"])
                        if part == "v" and v_trans:
                            shapes[part] = (t, _shape(L["v_shape"], name, limits.n_embd_v, n_cells * t.type_size))
                        else:
                            shapes[part] = (t, _shape(L[f"{part}_shape"], name, n_cells, limits.row_bytes(t, part)))
                    # rows by shape only (no memory): state_buffer places them in the blob
                    (kt, k_shape), (vt, v_shape) = shapes["k"], shapes["v"]
                    layers.append(LayerKV(li, L["model_layer"], bool(L["sliding_window"]), kt, _no_rows(k_shape), vt,
                                          _no_rows(v_shape), v_trans))
                    jobs.append((ci, si, li, L, cells, v_trans))
                streams.append(Stream(cells, layers))
            caches.append(Cache(c["name"], streams))
        try:
            blob, state, write_between = state_buffer(LlamaState(kind, caches, arch, seq_id, bool(layout["has_cell_ext"])))
        except StateLayoutError as e:
            raise FormatError(f"the header's state layout is inconsistent: {e}") from None
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, StateLayoutError) as e:
        raise FormatError(f"the header's state layout is malformed: {e!r}") from None
    # decoding is outside that: a decoder's own exception is not a header's fault, and a
    # FormatError is the decoders' to raise (tests/test_fuzz.py holds them to it)
    try:
        def read(job) -> dict:
            return {part: section(f"{part}.{job[0]}.{job[1]}.{job[2]}") for part in ("k", "v")}

        gpu = _gpu_decoder() if _batchable(pipeline, dims, jobs) else None
        if gpu is not None:  # every section in one GPU batch
            gpu(pipeline, [sj for job in jobs for sj in _layer_sections(pipeline, dims, job, state.caches[job[0]].streams[job[1]]
                                                                         .layers[job[2]], read(job))])
            write_between()
            return blob, state
        if _native_batches() and _batchable(pipeline, dims, jobs):
            # each section's batch prepared here (Python) while the pool runs the ones before
            # (the CPU library, without the GIL); a section at a time, not a layer, so that each
            # core's symbol buffer and the batches waiting hold half as much
            from . import section_decode

            def prepared(item):
                job, part = item
                ci, si, li = job[:3]
                data = {part: section(f"{part}.{ci}.{si}.{li}")}
                return section_decode.prepare(pipeline, _layer_sections(pipeline, dims, job, state.caches[ci].streams[si].layers[li],
                                                                        data, (part,)), defer_basis=True)

            # the batches waiting hold at most 1/32 of the state (7680 SmolLM2 tokens: ~8 of ~0.7 MB)
            prepare_and_run(prepared, section_decode.run_native, [(job, part) for job in jobs for part in ("k", "v")],
                            cost=lambda prep: prep.nbytes, budget=blob.nbytes // 32)
            write_between()
            return blob, state

        def decode_layer(job) -> None:
            """Decode one layer's K and V sections into their place in the blob."""
            ci, si, li, L, cells, v_trans, data = job
            data = data if data is not None else read(job)
            dest = state.caches[ci].streams[si].layers[li]
            arrays = []
            for part in ("k", "v"):
                name = f"{part}.{ci}.{si}.{li}"
                t, rows = (dest.k_type, dest.k) if part == "k" else (dest.v_type, dest.v)
                coded = np.frombuffer(data[part], np.uint8)
                if dims:  # values: back into the rows and layout the context expects
                    n_embd = rows.shape[0] if part == "v" and v_trans else rows.shape[1] // t.type_size * t.block_size
                    info = _value_info(pipeline, name, part, t, cells, L["model_layer"], bool(L["sliding_window"]), n_embd, dims)
                    arrays.append(_unrotated(pipeline.decode_values(coded, info), t, info, dims))
                    continue
                raw = pipeline.decode(coded, TensorInfo(name, t.name, t.float_bytes, rows.size))
                if raw.size != rows.size:
                    raise FormatError(f"section {name!r} decodes to {raw.size} bytes, expected {rows.size}")
                rows[...] = raw.reshape(rows.shape)
            if dims:
                made = LayerKV.from_values(li, L["model_layer"], bool(L["sliding_window"]), dest.k_type, arrays[0],
                                           dest.v_type, arrays[1], v_trans)
                for got, want in ((made.k, dest.k), (made.v, dest.v)):
                    if got.shape != want.shape:
                        raise FormatError(f"layer {ci}.{si}.{li}: values make rows of shape {got.shape}, the header says {want.shape}")
                    want[...] = got

        # the layers decode on all cores (the kernels release the GIL), each into its place,
        # reading their own sections where reads may run at once (memory then holds a layer per
        # core, not the file); else the sections are read here first, in order (a remote file
        # reads one range at a time)
        parallel_map(decode_layer, [(*job, None if concurrent_reads else read(job)) for job in jobs])
        write_between()
        return blob, state
    except StateLayoutError as e:  # _value_info: rows that are not whole heads
        raise FormatError(f"the header's state layout is inconsistent: {e}") from None


def _gpu_decoder():
    """section_decode.decode_sections where the cuda backend is chosen (NEXUS_GGUF_BACKEND=cuda),
    else None."""
    if backend_name() != "cuda":
        return None
    from . import section_decode

    return section_decode.decode_sections


def _native_batches() -> bool:
    """Whether lattice sections decode through section_decode's batch on the CPU library (its
    one-pass C loop over head vectors) rather than stage by stage: where the native backend runs."""
    return backend_name() == "native"


def _layer_sections(pipeline: Pipeline, dims, job: tuple, dest: LayerKV, data: dict, parts=("k", "v")) -> list:
    """section_decode.SectionJob of a layer's K and V sections (those of `parts`), their rows
    those of `dest`."""
    from . import section_decode

    ci, si, li, L, cells, v_trans = job[:6]
    out = []
    for part in parts:
        t, rows = (dest.k_type, dest.k) if part == "k" else (dest.v_type, dest.v)
        transposed = part == "v" and v_trans
        n_embd = rows.shape[0] if transposed else rows.shape[1] // t.type_size * t.block_size
        info = _value_info(pipeline, f"{part}.{ci}.{si}.{li}", part, t, cells, L["model_layer"], bool(L["sliding_window"]),
                           n_embd, dims)
        out.append(section_decode.SectionJob(info, data[part], rows, t.name == "f16", transposed))
    return out


def _batchable(pipeline: Pipeline, dims, jobs: list) -> bool:
    """Whether these K/V sections can decode as section_decode batches (the presets' value path
    into f16/f32 rows) on the GPU or the CPU library."""
    from . import section_decode

    types = {L[f"{part}_type"] for (_, _, _, L, _, _) in jobs for part in ("k", "v")}
    return bool(dims) and section_decode.unsupported(pipeline, dims, types) is None


def _cells_from_bytes(data: np.ndarray, n: int, has_ext: bool) -> Cells:
    try:
        return parse_cells(data.tobytes(), n, has_ext)
    except StateLayoutError as e:
        raise FormatError(f"cell records: {e}") from None


def encode_tokens(tokens: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(tokens, dtype="<i4").view(np.uint8).reshape(-1)
    return meta_pipeline().encode(raw, _meta_info("tokens", raw.size))


def decode_tokens(data, n_tokens: int, limits: Limits) -> np.ndarray:
    if not 0 < n_tokens <= limits.n_ctx:
        raise FormatError(f"{n_tokens} prompt tokens, the context holds {limits.n_ctx}")
    raw = meta_pipeline().decode(np.frombuffer(data, np.uint8), _meta_info("tokens", 4 * n_tokens))
    if raw.size != 4 * n_tokens:
        raise FormatError("tokens section does not hold the stated token count")
    return raw.view("<i4").astype(np.int32)


def encode_logits(logits: np.ndarray, dtype: str = "f32") -> np.ndarray:
    raw = np.ascontiguousarray(logits, dtype=_NUMPY_LOGITS[dtype]).view(np.uint8).reshape(-1)
    return meta_pipeline().encode(raw, _meta_info("logits", raw.size))


def decode_logits(data, n_vocab: int, dtype: str, limits: Limits) -> np.ndarray:
    if dtype not in LOGITS_DTYPES or n_vocab != limits.n_vocab:
        raise FormatError(f"a logits row of {n_vocab} {dtype} values does not fit a vocabulary of {limits.n_vocab}")
    width = np.dtype(_NUMPY_LOGITS[dtype]).itemsize
    raw = meta_pipeline().decode(np.frombuffer(data, np.uint8), _meta_info("logits", width * n_vocab))
    if raw.size != width * n_vocab:
        raise FormatError("logits section does not hold one row of the vocabulary")
    return raw.view(_NUMPY_LOGITS[dtype]).astype(np.float32)
