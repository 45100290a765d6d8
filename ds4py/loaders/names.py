"""The canonical tensor names and shapes of a DeepSeek V4 model: the official checkpoint's names,
with each layer's routed experts stacked as `layers.{i}.ffn.experts.w1|w2|w3` [experts, out, in].

`expected_shapes(config)` is the schema every loader validates against; `storage(name)` says how the
official checkpoint stores a tensor (fp8 with 128x128 block scales, fp4 experts, bf16 or f32).
"""

from __future__ import annotations

from ds4py.config import ModelConfig


def block_shapes(config: ModelConfig, prefix: str, layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one transformer block; `layer` picks its compress ratio and hash routing."""
    c = config
    D, H, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    hc = c.hc_mult
    n_mix = (2 + hc) * hc
    ratio = c.compress_ratios[layer]
    s: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (D,),
        "ffn_norm.weight": (D,),
        "hc_attn_fn": (n_mix, hc * D),
        "hc_attn_base": (n_mix,),
        "hc_attn_scale": (3,),
        "hc_ffn_fn": (n_mix, hc * D),
        "hc_ffn_base": (n_mix,),
        "hc_ffn_scale": (3,),
        "attn.wq_a.weight": (c.q_lora_rank, D),
        "attn.q_norm.weight": (c.q_lora_rank,),
        "attn.wq_b.weight": (H * hd, c.q_lora_rank),
        "attn.wkv.weight": (hd, D),
        "attn.kv_norm.weight": (hd,),
        "attn.wo_a.weight": (c.o_groups * c.o_lora_rank, H * hd // c.o_groups),
        "attn.wo_b.weight": (D, c.o_groups * c.o_lora_rank),
        "attn.attn_sink": (H,),
        "ffn.gate.weight": (c.n_routed_experts, D),
        "ffn.experts.w1": (c.n_routed_experts, c.moe_intermediate_size, D),
        "ffn.experts.w2": (c.n_routed_experts, D, c.moe_intermediate_size),
        "ffn.experts.w3": (c.n_routed_experts, c.moe_intermediate_size, D),
    }
    if c.n_shared_experts:
        inter = c.moe_intermediate_size * c.n_shared_experts
        s["ffn.shared_experts.w1.weight"] = (inter, D)
        s["ffn.shared_experts.w2.weight"] = (D, inter)
        s["ffn.shared_experts.w3.weight"] = (inter, D)
    if layer < c.num_hash_layers:
        s["ffn.gate.tid2eid"] = (c.vocab_size, c.num_experts_per_tok)
    else:
        s["ffn.gate.bias"] = (c.n_routed_experts,)
    if ratio:
        overlap = 2 if ratio == 4 else 1  # ratio-4 compressors keep two overlapping series
        s["attn.compressor.wkv.weight"] = (overlap * hd, D)
        s["attn.compressor.wgate.weight"] = (overlap * hd, D)
        s["attn.compressor.ape"] = (ratio, overlap * hd)
        s["attn.compressor.norm.weight"] = (hd,)
    if ratio == 4:
        ih, ihd = c.index_n_heads, c.index_head_dim
        s["attn.indexer.wq_b.weight"] = (ih * ihd, c.q_lora_rank)
        s["attn.indexer.weights_proj.weight"] = (ih, D)
        s["attn.indexer.compressor.wkv.weight"] = (2 * ihd, D)
        s["attn.indexer.compressor.wgate.weight"] = (2 * ihd, D)
        s["attn.indexer.compressor.ape"] = (ratio, 2 * ihd)
        s["attn.indexer.compressor.norm.weight"] = (ihd,)
    return {f"{prefix}{k}": v for k, v in s.items()}


def expected_shapes(config: ModelConfig, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    c = config
    D, V, hc = c.hidden_size, c.vocab_size, c.hc_mult
    s: dict[str, tuple[int, ...]] = {
        "embed.weight": (V, D),
        "head.weight": (V, D),
        "norm.weight": (D,),
        "hc_head_fn": (hc, hc * D),
        "hc_head_base": (hc,),
        "hc_head_scale": (1,),
    }
    for i in range(c.num_hidden_layers):
        s.update(block_shapes(c, f"layers.{i}.", i))
    if mtp:
        for j in range(c.num_nextn_predict_layers):
            layer = c.num_hidden_layers + j
            if layer >= len(c.compress_ratios):
                break
            p = f"mtp.{j}."
            s.update(block_shapes(c, p, layer))
            s.update({
                p + "e_proj.weight": (D, D),
                p + "h_proj.weight": (D, D),
                p + "enorm.weight": (D,),
                p + "hnorm.weight": (D,),
                p + "norm.weight": (D,),
                p + "hc_head_fn": (hc, hc * D),
                p + "hc_head_base": (hc,),
                p + "hc_head_scale": (1,),
            })
    return s


FP8_SUFFIXES = (
    "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
    "attn.indexer.wq_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
    "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight",
)


def storage(name: str) -> str:
    """How the official checkpoint stores `name`: 'fp8', 'fp4', 'bf16', 'f32' or 'i32'."""
    if ".ffn.experts." in name:
        return "fp4"
    if name.endswith(FP8_SUFFIXES):
        return "fp8"
    if name.endswith("tid2eid"):
        return "i32"
    if name.endswith(("embed.weight", "head.weight")) or name.endswith(
        ("compressor.wkv.weight", "compressor.wgate.weight", "weights_proj.weight", "ffn.gate.weight")
    ):
        return "bf16"
    return "f32"
