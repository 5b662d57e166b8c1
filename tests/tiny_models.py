"""Tiny random-weight GGUF models written with the gguf package, for layouts SmolLM2 does not
have (iSWA). Byte-level BPE vocabulary of 256 tokens plus an end-of-text token."""

from __future__ import annotations

import numpy as np


def _byte_level_tokens() -> list[str]:
    # GPT-2's bytes_to_unicode: every byte gets a printable character
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_gemma3(path, n_layer: int = 6, n_embd: int = 64, n_head: int = 2, n_head_kv: int = 1,
                      head_dim: int = 32, n_ff: int = 128, sliding_window: int = 8, seed: int = 0) -> str:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = _byte_level_tokens() + ["he", "<|endoftext|>"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(1024)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(sliding_window)
    w.add_rope_freq_base(1_000_000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges(["h e"])  # the reader needs at least one merge
    w.add_eos_token_id(n_vocab - 1)
    w.add_bos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)

    def t(name, *shape, scale=0.05):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name, n):
        w.add_tensor(name, np.ones(n, np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    ones("output_norm.weight", n_embd)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        t(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        ones(f"blk.{i}.post_attention_norm.weight", n_embd)
        ones(f"blk.{i}.attn_k_norm.weight", head_dim)
        ones(f"blk.{i}.attn_q_norm.weight", head_dim)
        ones(f"blk.{i}.ffn_norm.weight", n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        ones(f"blk.{i}.post_ffw_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# What each architecture's loader requires beyond the llama-style decoder (llama.cpp
# src/models/<arch>.cpp load_arch_tensors / load_arch_hparams):
#   llama    RMS norms, separate q/k/v, gated FFN; rope.dimension_count must equal head_dim
#   qwen2    as llama, plus q/k/v biases; n_head * head_dim == n_embd
#   stablelm LayerNorm with biases (layer_norm_epsilon), an output matrix; partial rotary allowed
#   chatglm  RMS norms, one fused SwiGLU ffn_up of 2 * n_ff rows; partial rotary allowed
TINY_ARCHS = ("llama", "qwen2", "stablelm", "chatglm")


def write_tiny_model(path, arch: str = "llama", n_rot: int | None = None, rope_scaling: dict | None = None,
                     rope_freq_factors=None, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                     n_head_kv: int = 1, n_ff: int = 32, freq_base: float = 10000.0, n_ctx_train: int = 1024,
                     seed: int = 0, matrix_type: str = "F16") -> str:
    """A tiny random-weight decoder of `arch` (see TINY_ARCHS), head_dim = n_embd / n_head.
    n_rot: rope.dimension_count (None: not written, llama.cpp then rotates the whole head).
    rope_scaling: {"type": "linear" | "yarn" | "none", "factor": float, "original_context_length": int},
    each key optional. rope_freq_factors: per rotated pair divisors of the angle (Llama 3's
    rope_freqs.weight, n_rot / 2 floats). Matrices are `matrix_type` (a gguf.GGMLQuantizationType
    name: F16, F32, Q8_0...; the same seed gives the same weights in each), norms and biases f32."""
    import gguf

    if arch not in TINY_ARCHS:
        raise ValueError(f"no tiny writer for arch {arch!r}")
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)
    tokens = _byte_level_tokens() + ["he", "<|endoftext|>"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if arch == "stablelm":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(freq_base)
    if n_rot is not None:
        w.add_rope_dimension_count(n_rot)
    if rope_scaling:
        if "type" in rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        if "factor" in rope_scaling:
            w.add_rope_scaling_factor(float(rope_scaling["factor"]))
        if "original_context_length" in rope_scaling:
            w.add_rope_scaling_orig_ctx_len(int(rope_scaling["original_context_length"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges(["h e"])
    w.add_eos_token_id(n_vocab - 1)
    w.add_bos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)

    qtype = gguf.GGMLQuantizationType[matrix_type]

    def mat(name, *shape, scale=0.05):
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vec(name, n, value=None, scale=0.05):
        data = np.full(n, value, np.float32) if value is not None else (rng.standard_normal(n) * scale).astype(np.float32)
        w.add_tensor(name, data)

    layer_norm = arch == "stablelm"
    mat("token_embd.weight", n_vocab, n_embd, scale=1.0)
    vec("output_norm.weight", n_embd, 1.0)
    if layer_norm:
        vec("output_norm.bias", n_embd, 0.0)
        mat("output.weight", n_vocab, n_embd)
    if rope_freq_factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freq_factors, np.float32))
    for i in range(n_layer):
        vec(f"blk.{i}.attn_norm.weight", n_embd, 1.0)
        if layer_norm:
            vec(f"blk.{i}.attn_norm.bias", n_embd, 0.0)
        mat(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        mat(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        mat(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        if arch == "qwen2":
            vec(f"blk.{i}.attn_q.bias", n_head * head_dim, scale=0.5)
            vec(f"blk.{i}.attn_k.bias", n_head_kv * head_dim, scale=0.5)
            vec(f"blk.{i}.attn_v.bias", n_head_kv * head_dim, scale=0.5)
        mat(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        vec(f"blk.{i}.ffn_norm.weight", n_embd, 1.0)
        if layer_norm:
            vec(f"blk.{i}.ffn_norm.bias", n_embd, 0.0)
        if arch == "chatglm":
            mat(f"blk.{i}.ffn_up.weight", 2 * n_ff, n_embd)
        else:
            mat(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
            mat(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        mat(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
