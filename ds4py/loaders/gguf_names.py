"""The GGUF `deepseek4` layout: canonical names <-> GGUF tensor names, and GGUF metadata <->
ModelConfig. Facts from llama.cpp's converter (conversion/deepseek.py, gguf-py constants) and from a
GGUF it wrote for a tiny checkpoint:

- tensors are `blk.N.*` plus `token_embd`, `output`, `output_norm`, `output_hc_{fn,base,scale}`; the
  routing bias is `blk.N.exp_probs_b.bias`; experts are stacked `ffn_{gate,down,up}_exps` [E, out, in];
- llama.cpp's MTP export puts the MTP block at `blk.{n_layer + j}` with `nextn.eh_proj` = [e_proj | h_proj]
  along the input axis; antirez/ds4's writers keep `mtp.{j}.*` under the official names: both are read.
  llama.cpp writes it as a file of its own (`convert_hf_to_gguf.py --mtp`, "mtp-*.gguf"): block_count counts the
  MTP block, `nextn_predict_layers` says how many, no main layer is there, and the root `output_hc_*` are the MTP
  block's hc head (`attach_mtp` adds such a file to a main one).
- GGUF lists dimensions innermost first; the reader reverses them into torch order.
"""

from __future__ import annotations

import re

from ds4py.config import ModelConfig
from ds4py.errors import ModelFormatError

ARCH = "deepseek4"

ROOT = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "head.weight": "output.weight",
    "hc_head_fn": "output_hc_fn.weight",
    "hc_head_base": "output_hc_base.weight",
    "hc_head_scale": "output_hc_scale.weight",
}

LAYER = {
    "hc_attn_fn": "hc_attn_fn.weight",
    "hc_attn_base": "hc_attn_base.weight",
    "hc_attn_scale": "hc_attn_scale.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight",
    "hc_ffn_base": "hc_ffn_base.weight",
    "hc_ffn_scale": "hc_ffn_scale.weight",
    "attn.attn_sink": "attn_sinks.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "ffn.experts.w1": "ffn_gate_exps.weight",
    "ffn.experts.w2": "ffn_down_exps.weight",
    "ffn.experts.w3": "ffn_up_exps.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}
MTP_EXTRA = {  # llama.cpp's names for the MTP-only tensors of block n_layer + j
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "norm.weight": "nextn.shared_head_norm.weight",
}
_CANONICAL_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def to_gguf_name(name: str) -> str:
    if name in ROOT:
        return ROOT[name]
    m = _CANONICAL_LAYER.match(name)
    if m and m.group(2) in LAYER:
        return f"blk.{m.group(1)}.{LAYER[m.group(2)]}"
    if name.startswith("mtp."):
        return name  # written under the official name (antirez/ds4 style)
    raise ModelFormatError(f"no GGUF name for tensor {name!r}")


def from_gguf_names(names: list[str], config: ModelConfig) -> dict[str, str]:
    """canonical name -> GGUF name for the tensors a file holds (main layers, and MTP in either style)."""
    inverse_root = {v: k for k, v in ROOT.items()}
    inverse_layer = {v: k for k, v in LAYER.items()}
    inverse_mtp = {v: k for k, v in MTP_EXTRA.items()}
    out = {}
    for g in names:
        if g in inverse_root:
            out[inverse_root[g]] = g
            continue
        if g.startswith("mtp."):
            out[g] = g
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", g)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        j = layer - config.num_hidden_layers
        prefix = f"layers.{layer}." if j < 0 else f"mtp.{j}."
        if rest in inverse_layer:
            out[prefix + inverse_layer[rest]] = g
        elif j >= 0 and rest in inverse_mtp:
            out[prefix + inverse_mtp[rest]] = g
        elif j >= 0 and rest == "nextn.eh_proj.weight":
            out[prefix + "eh_proj.weight"] = g  # split into e_proj / h_proj by the reader
    return out


# --- metadata ------------------------------------------------------------------------------------------
GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}  # llama.cpp's ExpertGatingFuncType values


def config_to_metadata(c: ModelConfig) -> list[tuple[str, object, str]]:
    """(key, value, gguf value type) in the order llama.cpp's converter writes them."""
    a = ARCH
    items: list[tuple[str, object, str]] = [
        (f"{a}.block_count", c.num_hidden_layers, "u32"),
        (f"{a}.context_length", c.max_position_embeddings, "u32"),
        (f"{a}.embedding_length", c.hidden_size, "u32"),
        (f"{a}.attention.head_count", c.num_attention_heads, "u32"),
        (f"{a}.attention.head_count_kv", 1, "u32"),
    ]
    if c.yarn:
        y = c.yarn
        items += [
            (f"{a}.rope.scaling.type", "yarn", "str"),
            (f"{a}.rope.scaling.factor", float(y["factor"]), "f32"),
            (f"{a}.rope.scaling.original_context_length", int(y["original_max_position_embeddings"]), "u32"),
        ]
        if y.get("beta_fast") is not None:
            items.append((f"{a}.rope.scaling.yarn_beta_fast", float(y["beta_fast"]), "f32"))
        if y.get("beta_slow") is not None:
            items.append((f"{a}.rope.scaling.yarn_beta_slow", float(y["beta_slow"]), "f32"))
    items += [
        (f"{a}.rope.freq_base", float(c.rope_theta), "f32"),
        (f"{a}.attention.layer_norm_rms_epsilon", float(c.rms_norm_eps), "f32"),
        (f"{a}.expert_count", c.n_routed_experts, "u32"),
        (f"{a}.expert_used_count", c.num_experts_per_tok, "u32"),
        (f"{a}.expert_gating_func", GATING[c.scoring_func], "u32"),
        (f"{a}.attention.key_length", c.head_dim, "u32"),
        (f"{a}.attention.value_length", c.head_dim, "u32"),
        ("general.file_type", 38, "u32"),  # MOSTLY_MXFP4_MOE, as llama.cpp sets for V4
        (f"{a}.rope.dimension_count", c.qk_rope_head_dim, "u32"),
        (f"{a}.attention.q_lora_rank", c.q_lora_rank, "u32"),
        (f"{a}.attention.sliding_window", c.sliding_window, "u32"),
        (f"{a}.expert_feed_forward_length", c.moe_intermediate_size, "u32"),
        (f"{a}.expert_shared_count", c.n_shared_experts, "u32"),
        (f"{a}.expert_weights_scale", float(c.routed_scaling_factor), "f32"),
        (f"{a}.expert_weights_norm", bool(c.norm_topk_prob), "bool"),
        (f"{a}.swiglu_clamp_exp", [float(c.swiglu_limit)] * c.num_hidden_layers, "f32[]"),
        (f"{a}.swiglu_clamp_shexp", [float(c.swiglu_limit)] * c.num_hidden_layers, "f32[]"),
        (f"{a}.attention.indexer.head_count", c.index_n_heads, "u32"),
        (f"{a}.attention.indexer.key_length", c.index_head_dim, "u32"),
        (f"{a}.attention.indexer.top_k", c.index_topk, "u32"),
        (f"{a}.attention.output_group_count", c.o_groups, "u32"),
        (f"{a}.attention.output_lora_rank", c.o_lora_rank, "u32"),
        (f"{a}.attention.compress_ratios", list(c.compress_ratios), "i32[]"),
        (f"{a}.attention.compress_rope_freq_base", float(c.compress_rope_theta), "f32"),
        (f"{a}.hyper_connection.count", c.hc_mult, "u32"),
        (f"{a}.hyper_connection.sinkhorn_iterations", c.hc_sinkhorn_iters, "u32"),
        (f"{a}.hyper_connection.epsilon", float(c.hc_eps), "f32"),
        (f"{a}.hash_layer_count", c.num_hash_layers, "u32"),
        (f"{a}.embedding_length_out", c.hidden_size * c.hc_mult, "u32"),
    ]
    return items


def f32_to_decimal(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{float(x):.7g}")


def metadata_to_config(md: dict, vocab_size: int, path: str) -> ModelConfig:
    a = ARCH

    def need(key: str):
        if f"{a}.{key}" not in md:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {a}.{key}; the file is incomplete or not V4")
        return md[f"{a}.{key}"]

    def get(key: str, default):
        return md.get(f"{a}.{key}", default)

    gating = {v: k for k, v in GATING.items()}.get(int(get("expert_gating_func", 4)), "sqrtsoftplus")
    yarn = None
    if get("rope.scaling.type", None) == "yarn":
        yarn = {"type": "yarn", "factor": float(need("rope.scaling.factor")),
                "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
                "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0))}
    clamp = get("swiglu_clamp_exp", [10.0])
    # llama.cpp counts the MTP blocks in block_count where it writes nextn_predict_layers (its MTP files; ds4py writes
    # neither the key nor the blocks in the count)
    nextn = get("nextn_predict_layers", None)
    n_layers = int(need("block_count")) - int(nextn or 0)
    ratios = [int(r) for r in need("attention.compress_ratios")]
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=int(need("embedding_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(need("attention.head_count")),
        head_dim=int(need("attention.key_length")),
        qk_rope_head_dim=int(need("rope.dimension_count")),
        q_lora_rank=int(need("attention.q_lora_rank")),
        o_groups=int(need("attention.output_group_count")),
        o_lora_rank=int(need("attention.output_lora_rank")),
        sliding_window=int(need("attention.sliding_window")),
        compress_ratios=ratios,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        compress_rope_theta=float(need("attention.compress_rope_freq_base")),
        rope_scaling=yarn,
        max_position_embeddings=int(get("context_length", 1048576)),
        index_n_heads=int(need("attention.indexer.head_count")),
        index_head_dim=int(need("attention.indexer.key_length")),
        index_topk=int(need("attention.indexer.top_k")),
        n_routed_experts=int(need("expert_count")),
        n_shared_experts=int(get("expert_shared_count", 1)),
        num_experts_per_tok=int(need("expert_used_count")),
        moe_intermediate_size=int(need("expert_feed_forward_length")),
        scoring_func=gating,
        norm_topk_prob=bool(get("expert_weights_norm", True)),
        routed_scaling_factor=float(get("expert_weights_scale", 1.5)),
        num_hash_layers=int(need("hash_layer_count")),
        swiglu_limit=float(clamp[0] if isinstance(clamp, (list, tuple)) else clamp),
        hc_mult=int(need("hyper_connection.count")),
        hc_sinkhorn_iters=int(need("hyper_connection.sinkhorn_iterations")),
        hc_eps=f32_to_decimal(need("hyper_connection.epsilon")),
        rms_norm_eps=f32_to_decimal(need("attention.layer_norm_rms_epsilon")),
        num_nextn_predict_layers=int(nextn if nextn is not None else max(len(ratios) - n_layers, 0)),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id", 0),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id", 1),
    )
