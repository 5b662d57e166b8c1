"""The `nexus-gguf` command line: save-state, generate, info, eval, calibrate, compress, decompress, serve, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import __version__
from . import llama_bridge as bridge
from .errors import NxkvError
from .progress import Progress


def read_prompt(path: str, encoding: str = "utf-8") -> str:
    """A prompt file's text, or one clear error: missing, unreadable, binary, not in `encoding`,
    or empty. llama.cpp tokenizes UTF-8, so other encodings are decoded first (--encoding)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NxkvError(f"{path}: no such prompt file") from None
    except OSError as e:
        raise NxkvError(f"{path}: cannot read the prompt ({e.strerror or e})") from None
    if b"\0" in data:
        raise NxkvError(f"{path} looks like a binary file (it holds NUL bytes), not a text prompt")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise NxkvError(
            f"{path} is not {encoding} text (byte 0x{data[e.start]:02x} at offset {e.start}); if it is in a legacy "
            "8-bit encoding, name it, e.g. --encoding latin-1 or --encoding cp1252"
        ) from None
    except LookupError:
        raise NxkvError(f"--encoding {encoding!r}: no such text encoding") from None
    if not text.strip():
        raise NxkvError(f"{path} is empty: there is no prompt to save")
    return text


def _context_size(model: str, n_tokens: int, asked: Optional[int], extra: int = 1) -> int:
    """n_ctx for a prompt of n_tokens plus `extra`: what --n-ctx asks if it is enough, else an
    error; without --n-ctx, what the prompt needs, as long as the model was trained that long."""
    need = n_tokens + extra
    if asked:
        if asked < need:
            raise NxkvError(f"the prompt needs a context of {need} tokens; --n-ctx {asked} is too small")
        return asked
    trained = bridge.trained_context(model)
    if trained and need > trained:
        raise NxkvError(
            f"the prompt needs a context of {need} tokens, more than the {trained} the model was trained on; "
            f"pass --n-ctx {need} to go on anyway (quality beyond the trained context is not guaranteed)"
        )
    return need


def _check_output(path: str) -> None:
    """Fail before the prefill, not after it, when the output cannot be written."""
    from .storage import is_url

    if is_url(path):
        return  # remote: the store says at write time
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise NxkvError(f"{path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise NxkvError(f"{path}: the directory {directory} is not writable")


def cmd_save_state(args) -> int:
    from .api import save_state
    from .pipeline import build_pipeline

    text = read_prompt(args.prompt_file, args.encoding)
    out = args.output or str(Path(args.prompt_file).with_suffix(".nxkv"))
    _check_output(out)
    pipeline = build_pipeline(args.preset, args.no or (), **stage_options(args))  # bad options fail before the prefill
    n = bridge.count_tokens(args.model, text)
    llm = bridge.open_llama(args.model, _context_size(args.model, n, args.n_ctx), args.threads, args.n_gpu_layers)
    tokens = bridge.tokenize(llm, text, add_bos=True)
    bridge.prefill(llm, tokens, Progress("prefill", "tok"))
    report = save_state(llm, out, pipeline)
    print(report.summary())
    _profile_hint(args.model, report)
    return 0


def _profile_hint(model: str, report) -> None:
    """Name `calibrate` where a lossy save found no bit profile for its model (unless asked for none)."""
    from . import bit_profile

    if report.bit_profile == "" and not bit_profile.disabled():
        print(f"note: no bit profile for this model; `nexus-gguf calibrate {model} TEXT` measures one once "
              "(files of the lossy presets about 9% smaller at the same quality on SmolLM2)", file=sys.stderr)


def stage_options(args) -> dict:
    """--k-bits / --v-bits / --set STAGE.OPTION=VALUE as save_state's keyword arguments."""
    out = {}
    if args.k_bits is not None:
        out["lattice_k_bits"] = args.k_bits
    if args.v_bits is not None:
        out["lattice_v_bits"] = args.v_bits
    for item in args.set or ():
        key, sep, value = item.partition("=")
        stage, dot, option = key.partition(".")
        if not (sep and dot and stage and option):
            raise NxkvError(f"--set {item!r}: expected STAGE.OPTION=VALUE, e.g. lattice.k_bits=3.5")
        try:
            out[f"{stage}_{option}"] = json.loads(value)
        except json.JSONDecodeError:
            out[f"{stage}_{option}"] = value
    return out


def _generate(llm, tokens: list[int], n: int, temp: float, stream=None) -> str:
    stream = stream or sys.stdout
    pieces = []
    for chunk in llm.create_completion(prompt=tokens, max_tokens=n, temperature=temp, stream=True):
        piece = chunk["choices"][0]["text"]
        pieces.append(piece)
        stream.write(piece)
        stream.flush()
    stream.write("\n")
    return "".join(pieces)


def cmd_generate(args) -> int:
    from .api import load_state, read_info

    info = read_info(args.state)
    extra_text = args.prompt or ""
    n_extra = bridge.count_tokens(args.model, extra_text) if extra_text else 0
    need = int(info["prompt"]["n_ctx_required"]) + n_extra + args.n + 1
    ctx = info["context"]
    llm = bridge.open_llama(
        args.model,
        max(args.n_ctx or 0, need),
        args.threads,
        args.n_gpu_layers,
        flash_attn=ctx["flash_attn"] == "enabled",
        type_k=ctx["type_k"],
        type_v=ctx["type_v"],
    )
    report = load_state(llm, args.state)
    print(
        f"restored {report.n_tokens} tokens from {report.file_bytes:,} B in {sum(report.seconds.values()):.2f}s",
        file=sys.stderr,
    )
    extra = bridge.tokenize(llm, extra_text, add_bos=False) if extra_text else []
    continue_restored(llm, report, extra, args.n, args.temp)
    return 0


def continue_restored(llm, report, extra: list[int], n: int, temp: float, stream=None) -> str:
    """Generate after load_state exactly as if the prompt had just been read: the first token
    comes from the logits saved with the prompt (greedy), or from decoding the appended text;
    only without either does llama-cpp-python replay the last prompt token (which can change
    the last digits of the logits, and so a near tie)."""
    stream = stream or sys.stdout
    tokens = list(llm.input_ids[: llm.n_tokens])
    head = ""
    if extra:
        llm.eval(extra)
        tokens += extra
    elif report.logits is not None and temp <= 0 and n > 0:
        first = int(np.argmax(report.logits))
        head = llm.detokenize([first], prev_tokens=tokens).decode("utf-8", errors="replace")
        stream.write(head)
        llm.eval([first])
        tokens.append(first)
        n -= 1
        if first == llm.token_eos() or n == 0:
            stream.write("\n")
            return head
    return head + _generate(llm, tokens, n, temp, stream)


def _stage_label(config: dict) -> str:
    """A stage as `info` names it: its id, and for the lattice its bits and what it codes on."""
    if config.get("id") != "lattice":
        return str(config.get("id"))
    parts = [f"K {config.get('k_bits')} / V {config.get('v_bits')} bits"]
    group = config.get("head_group", 1)
    if group != 1:
        parts.append("heads grouped" if group == 0 else f"heads in groups of up to {group}")
    if config.get("transform", "none") != "none":
        parts.append(str(config["transform"]))
    if config.get("classes"):
        parts.append("classes")
    if config.get("k_weights", "none") != "none":
        extra = config.get("k_weights_bits") or 0
        parts.append(f"K weighted by the {config['k_weights']}" + (f" (+{extra} bits)" if extra else ""))
    if config.get("token_steps"):
        parts.append(f"steps by importance (^-{config['token_steps']}, up to {config.get('step_octaves')} octaves coarser)")
    if config.get("rdo"):
        parts.append(f"points by rate and distortion ({config['rdo']} per bit)")
    if config.get("basis_prune") and config.get("transform", "none") != "none":
        parts.append(f"components below {config['basis_prune']} steps² left out")
    return f"lattice ({', '.join(parts)})"


def cmd_info(args) -> int:
    from .api import read_info

    info = read_info(args.state, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m, p = info["model"], info["prompt"]
    print(f"file       {args.state}: {info['file_bytes']:,} B, raw state {info['raw']['bytes']:,} B, ratio {info['ratio']:.2f}x")
    print(f"model      {m['file_name']} ({m['arch']}, {m['n_layer']} layers, fingerprint {m['fingerprint'][:12]})")
    print(f"prompt     {p['n_tokens']} tokens, needs n_ctx >= {p['n_ctx_required']}")
    stages = [_stage_label(s) for s in info["pipeline"]["stages"] if s.get("id") != "evict"]  # 0.1 files listed it there
    print(f"pipeline   {info['pipeline']['preset']}: " + " -> ".join(stages))
    sc, ev = info["scoring"], info["eviction"]
    if sc:
        print(f"scoring    {sc['used']} importance from the last {sc['window']} tokens"
              f"{'; ' + sc['note'] if sc.get('note') else ''}")
    if ev:
        print(f"eviction   kept {ev['kept']} cells (keep {ev['keep']}, {ev['sinks']} sinks and the last {ev['window']} always)")
    for stage, note in (info.get("notes") or {}).items():
        print(f"note       {stage}: {note}")
    print(f"context    {info['context']}")
    print(f"written by {info['software']} at {info['created']}")
    if args.verify:
        print("checksums  all sections verified")
    return 0


def cmd_demo(args) -> int:
    """The bundled prompt stored with each preset side by side: sizes, load against prefill
    time, and whether the continuation after each restore matches reading the prompt."""
    import importlib.resources
    import io

    from .api import load_state, save_state
    from .default_model import default_model_path
    from .pipeline import build_pipeline

    model = args.model or default_model_path()
    presets = _list(args.presets)
    for preset in presets:
        build_pipeline(preset)  # an unknown preset fails before the model loads
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise NxkvError(f"{out_dir}: no such directory")
    text = importlib.resources.files("nexus_gguf").joinpath("data/demo_prompt.txt").read_text(encoding="utf-8")
    llm = bridge.open_llama(model, 2048, args.threads)
    tokens = bridge.tokenize(llm, text, add_bos=True)
    print(f"model: {os.path.basename(model)}; prompt: {len(tokens)} tokens of the bundled demo text")
    t0 = time.perf_counter()
    bridge.prefill(llm, tokens, Progress("prefill", "tok"))
    prefill_s = time.perf_counter() - t0
    saved = {p: save_state(llm, out_dir / f"demo-{p}.nxkv", preset=p) for p in presets}
    direct = _generate(llm, tokens, args.n, 0.0, io.StringIO())
    rows, texts = [], {}
    for p, report in saved.items():
        other = bridge.open_llama(model, 2048, args.threads)
        lr = load_state(other, report.path)
        load_s = sum(lr.seconds.values())
        texts[p] = continue_restored(other, lr, [], args.n, 0.0, io.StringIO())
        rows.append((p, report.path, report.file_bytes, report.ratio, load_s, prefill_s / load_s))
    print(f"prefill: {prefill_s:.2f} s; llama.cpp's raw state: {next(iter(saved.values())).raw_bytes:,} B\n")
    print(f"{'preset':<10} {'file':<22} {'bytes':>13} {'ratio':>7} {'load':>8} {'vs prefill':>12}")
    for p, path, size, ratio, load_s, speedup in rows:
        print(f"{p:<10} {os.path.basename(path):<22} {size:>13,} {ratio:>6.2f}x {load_s:>7.2f}s {speedup:>9.0f}x faster")
    print(f"\n--- the next {args.n} tokens after reading the prompt ---\n{direct.strip()}")
    for p in presets:
        same = texts[p] == direct
        print(f"\n--- after restoring demo-{p}.nxkv: {'the same text' if same else 'a different text'} ---")
        if not same:
            print(texts[p].strip())
    return 0


def cmd_compress(args) -> int:
    """A llama.cpp session or slot file as a .nxkv file."""
    import numpy as np

    from .api import save_state
    from .cache_convert import into_stream, layout_of
    from .llama_files import read_llama_file
    from .llama_state import parse_state, write_state
    from .pipeline import build_pipeline

    src = read_llama_file(args.file)
    out = args.output or str(Path(args.file).with_suffix(".nxkv"))
    _check_output(out)
    pipeline = build_pipeline(args.preset, args.no or (), **stage_options(args))
    bridge.check_model_file(args.model)
    # one sequence, in the one stream of the Llama that stores it
    state = parse_state(src.blob, src.state_kind, bridge.state_layout_of_file(args.model))
    if src.kind == "session":
        state = state.sequence(args.seq)
    elif args.seq:
        raise NxkvError("--seq picks a sequence of a session file; a slot file holds one")
    state = into_stream(state, 1, 0)
    layout = layout_of(state)
    if layout is None or src.tokens.size == 0:
        raise NxkvError(f"{args.file} holds no prompt" + (f" in sequence {args.seq}" if args.seq else ""))
    if state.n_pos != src.tokens.size:
        raise NxkvError(f"{args.file}: its {src.tokens.size} tokens are not sequence {args.seq}'s {state.n_pos} positions")
    k_type, v_type, v_trans = layout
    llm = bridge.open_llama(args.model, _context_size(args.model, src.tokens.size, args.n_ctx), args.threads,
                            args.n_gpu_layers, type_k=k_type.id, type_v=v_type.id, flash_attn=not v_trans)
    if not bridge.set_seq_state(llm, write_state(state), 0):
        raise NxkvError(f"llama.cpp refused the state in {args.file}: was it saved from {args.model}?")
    bridge.set_prompt(llm, np.asarray(src.tokens, np.int32), None)
    report = save_state(llm, out, pipeline)
    print(report.summary())
    _profile_hint(args.model, report)
    return 0


def cmd_decompress(args) -> int:
    """A .nxkv file back as a llama.cpp session or slot file, for tools that read only those."""
    from .api import load_state, read_info
    from .format import write_atomic
    from .llama_files import LlamaFile

    info = read_info(args.state)
    out = args.output or str(Path(args.state).with_suffix(".bin" if args.format == "slot" else ".session"))
    _check_output(out)
    ctx = info["context"]
    llm = bridge.open_llama(args.model, max(args.n_ctx or 0, int(info["prompt"]["n_ctx_required"]) + 1), args.threads,
                            args.n_gpu_layers, flash_attn=ctx["flash_attn"] == "enabled", type_k=ctx["type_k"],
                            type_v=ctx["type_v"])
    report = load_state(llm, args.state)
    blob = bridge.get_context_state(llm) if args.format == "session" else bridge.get_seq_state(llm, 0)
    n = write_atomic(out, LlamaFile(args.format, llm.input_ids[: llm.n_tokens], blob).to_buffers())
    print(f"{out}: llama.cpp {args.format} file of {report.n_tokens} tokens, {n:,} B")
    return 0


def cmd_serve(args) -> int:
    from .pipeline import build_pipeline
    from .server import serve

    build_pipeline(args.preset)  # an unknown preset fails before the model loads
    bridge.check_model_file(args.model)  # and a missing or foreign model file
    options = {"n_ctx": args.n_ctx or 4096, "n_gpu_layers": args.n_gpu_layers}
    if args.threads:
        options["n_threads"] = args.threads
    serve(args.model, args.cache_dir, int(args.cache_gb * (1 << 30)), args.preset, args.host, args.port, **options)
    return 0


def _list(value: str, typ=str) -> list:
    try:
        return [typ(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise NxkvError(f"{value!r} is not a comma-separated list of {typ.__name__}") from None


def cmd_eval(args) -> int:
    from .evaluate import context_needed, evaluate
    from .pipeline import PRESETS
    from .report import pareto_plot, text_table

    text = read_prompt(args.text_file, args.encoding)
    prefixes = _list(args.prefix_tokens, int)
    presets = _list(args.presets) if args.presets is not None else list(PRESETS)
    llm = bridge.open_llama(args.model, max(args.n_ctx or 0, context_needed(prefixes, args.eval_tokens)), args.threads, args.n_gpu_layers)
    rows = evaluate(
        llm,
        text,
        text_name=Path(args.text_file).stem,
        presets=presets,
        prefix_tokens=prefixes,
        eval_tokens=args.eval_tokens,
        baselines=not args.no_baselines,
        ablate=_list(args.ablate) if args.ablate else [],
        recall_trials=args.recall_trials,
        seed=args.seed,
        progress_factory=lambda label: Progress(label, "tok"),
        log=lambda line: print(line, file=sys.stderr),
    )
    print(text_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        print(f"rows written to {args.json}", file=sys.stderr)
    if args.plot:
        pareto_plot(rows, args.plot, f"{os.path.basename(args.model)}, {Path(args.text_file).name}")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from . import bit_profile
    from .calibrate import calibrate

    text = read_prompt(args.text_file, args.encoding)
    if args.output:
        _check_output(args.output)
    llm = bridge.open_llama(args.model, args.n_ctx or args.tokens + args.eval_tokens, args.threads, args.n_gpu_layers)
    progress = Progress("calibrate", "sections")
    profile = calibrate(llm, text, n_tokens=args.tokens, eval_tokens=args.eval_tokens, preset=args.preset,
                        text_name=Path(args.text_file).name, progress=progress)
    out = args.output or str(bit_profile.user_dir() / f"{profile.fingerprint}.json")
    bit_profile.write(profile, out)
    k, v = np.asarray(profile.k_bits), np.asarray(profile.v_bits)
    print(f"bit profile of {profile.model} (fingerprint {profile.name}): K {k.min():+.3g} .. {k.max():+.3g} bits, "
          f"V {v.min():+.3g} .. {v.max():+.3g}, mean {np.concatenate([k, v]).mean():+.3f}; "
          f"base KLD {profile.source['base_kld']:.5f}")
    print(f"written to {out}" + ("" if args.output else ": save-state uses it for this model from now on"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_PRESET, PRESETS

    p = argparse.ArgumentParser(prog="nexus-gguf", description="Compressed llama.cpp prompt states (.nxkv).")
    p.add_argument("--version", action="version", version=f"nexus-gguf {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
        sp.add_argument("--n-gpu-layers", type=int, default=0)
        sp.add_argument("--n-ctx", type=int, default=None, help="context size (default: what the prompt needs)")

    def state_options(sp):
        sp.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"how much to compress (default {DEFAULT_PRESET}; see the README's table)")
        sp.add_argument("--k-bits", type=float, help="lattice bits per K value (lossy presets)")
        sp.add_argument("--v-bits", type=float, help="lattice bits per V value (lossy presets)")
        sp.add_argument("--no", action="append", metavar="STAGE", help="leave a stage of the preset out, or evict (repeatable)")
        sp.add_argument("--set", action="append", metavar="STAGE.OPTION=VALUE", help="override a stage option (repeatable)")

    s = sub.add_parser("save-state", help="read a prompt and store its state in a .nxkv file")
    s.add_argument("model")
    s.add_argument("prompt_file")
    s.add_argument("-o", "--output", help="output path (default: PROMPT_FILE with .nxkv)")
    state_options(s)
    s.add_argument("--encoding", default="utf-8", help="the prompt file's text encoding (default utf-8)")
    common(s)
    s.set_defaults(func=cmd_save_state)

    g = sub.add_parser("generate", help="restore a .nxkv state and generate a continuation")
    g.add_argument("model")
    g.add_argument("state")
    g.add_argument("--prompt", help="text appended after the stored prompt")
    g.add_argument("-n", type=int, default=128, help="tokens to generate")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    common(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="show what a .nxkv file holds")
    i.add_argument("state")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true", help="check every section's checksum")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="measure size, quality and speed of every preset against llama.cpp's own options")
    e.add_argument("model")
    e.add_argument("text_file", help="the text whose prefixes are stored and continued")
    e.add_argument("--presets", help=f"comma-separated presets (default: all: {','.join(PRESETS)})")
    e.add_argument("--prefix-tokens", default="1024", help="comma-separated prefix lengths (default 1024)")
    e.add_argument("--eval-tokens", type=int, default=256, help="continuation tokens compared (default 256)")
    e.add_argument("--ablate", help="comma-separated presets to re-run with each stage left out in turn")
    e.add_argument("--no-baselines", action="store_true", help="only the raw state, no zstd / Q8_0 / Q5_0 / Q4_0 rows")
    e.add_argument("--recall-trials", type=int, default=4, help="pass-key documents per prefix (0: skip)")
    e.add_argument("--seed", type=int, default=0, help="seed of the pass-key positions and keys")
    e.add_argument("--encoding", default="utf-8", help="the text file's encoding (default utf-8)")
    e.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    e.add_argument("--plot", metavar="OUT.png", help="write the Pareto plot (needs matplotlib)")
    common(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("calibrate", help="measure how many bits each layer needs (a bit profile, once per model)")
    b.add_argument("model")
    b.add_argument("text_file", help="a text of at least --tokens + --eval-tokens tokens, like your prompts")
    b.add_argument("--tokens", type=int, default=1024, help="prompt tokens stored (default 1024)")
    b.add_argument("--eval-tokens", type=int, default=200, help="continuation tokens compared (default 200)")
    b.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"preset measured (default {DEFAULT_PRESET})")
    b.add_argument("-o", "--output", help="profile path (default: the user's profile directory, where save-state finds it)")
    b.add_argument("--encoding", default="utf-8", help="the text file's encoding (default utf-8)")
    common(b)
    b.set_defaults(func=cmd_calibrate)

    c = sub.add_parser("compress", help="turn a llama.cpp session file (--prompt-cache) or slot file into .nxkv")
    c.add_argument("model")
    c.add_argument("file", help="a file written by llama_state_save_file or llama_state_seq_save_file")
    c.add_argument("-o", "--output", help="output path (default: FILE with .nxkv)")
    c.add_argument("--seq", type=int, default=0, help="the sequence of a session file to store (default 0)")
    state_options(c)
    common(c)
    c.set_defaults(func=cmd_compress)

    x = sub.add_parser("decompress", help="write a .nxkv state back as a llama.cpp session or slot file")
    x.add_argument("model")
    x.add_argument("state")
    x.add_argument("-o", "--output", help="output path (default: STATE with .session or .bin)")
    x.add_argument("--format", choices=["session", "slot"], default="session",
                   help="session: llama_state_load_file / --prompt-cache (default); slot: llama-server's slot files")
    common(x)
    x.set_defaults(func=cmd_decompress)

    v = sub.add_parser("serve", help="llama-cpp-python's OpenAI-compatible server with the compressed prompt cache")
    v.add_argument("model")
    v.add_argument("--cache-dir", required=True, help="where the .nxkv prompt states go (shared by servers)")
    v.add_argument("--cache-gb", type=float, default=4.0, help="cache capacity in GiB (default 4)")
    v.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    common(v)
    v.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="store the bundled prompt with each preset and compare what it restores")
    d.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--presets", default="lossless,high", help="comma-separated presets (default: lossless,high)")
    d.add_argument("--out-dir", default=".", help="where demo-PRESET.nxkv files go (default: here)")
    d.add_argument("-n", type=int, default=48)
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NxkvError, OSError) as e:
        if args.debug:
            raise
        print(f"nexus-gguf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nexus-gguf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
