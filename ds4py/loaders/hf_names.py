"""Canonical (official) tensor names <-> transformers' DeepseekV4ForCausalLM names.

Facts from transformers' conversion_mapping.py ('deepseek_v4'): mid-key renames, the indexer moved
under the compressor, per-expert w1/w3 merged into `experts.gate_up_proj` [E, 2I, D] and w2 into
`experts.down_proj` [E, D, I]. transformers does not instantiate the MTP block."""

from __future__ import annotations

import re

import torch

# applied in order, canonical -> transformers (on names without the `model.` prefix)
_RENAMES = [
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^hc_head_fn$", "hc_head.hc_fn"),
    (r"^hc_head_base$", "hc_head.hc_base"),
    (r"^hc_head_scale$", "hc_head.hc_scale"),
    (r"\.attn\.indexer\.compressor\.", ".attn.compressor.indexer."),
    (r"\.attn\.indexer\.weights_proj\.", ".attn.compressor.indexer.scorer.weights_proj."),
    (r"\.attn\.indexer\.wq_b\.", ".attn.compressor.indexer.q_b_proj."),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_EXPERTS = re.compile(r"^layers\.(\d+)\.ffn\.experts\.w([123])$")


def to_transformers_name(name: str) -> str:
    if name == "head.weight":
        return "lm_head.weight"
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return "model." + name


def to_transformers_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical float tensors -> a state dict DeepseekV4ForCausalLM loads with strict=True."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.startswith("mtp.") or _EXPERTS.match(name):
            continue
        out[to_transformers_name(name)] = t.long() if name.endswith("tid2eid") else t
    layers = sorted({int(m.group(1)) for n in weights if (m := _EXPERTS.match(n))})
    for i in layers:
        p = f"layers.{i}.ffn.experts."
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([weights[p + "w1"], weights[p + "w3"]], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = weights[p + "w2"]
    return out


def canonical_names(names: list[str]) -> dict[str, str]:
    """transformers name -> canonical name, for every name but the merged expert tensors."""
    return {to_transformers_name(n): n for n in names}


def from_transformers_state_dict(state: dict[str, torch.Tensor], canonical: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of `to_transformers_state_dict`: a DeepseekV4ForCausalLM state dict -> canonical tensors,
    for the canonical names listed (from `names.expected_shapes`)."""
    by_hf = canonical_names([n for n in canonical if not _EXPERTS.match(n)])
    out = {name: state[hf] for hf, name in by_hf.items() if hf in state}
    for name in canonical:
        m = _EXPERTS.match(name)
        if m:
            i, k = m.groups()
            p = f"model.layers.{i}.mlp.experts."
            if k == "2":
                out[name] = state[p + "down_proj"]
            else:
                gate_up = state[p + "gate_up_proj"]  # [E, 2I, D]
                half = gate_up.shape[1] // 2
                out[name] = gate_up[:, :half] if k == "1" else gate_up[:, half:]
    missing = [n for n in canonical if n not in out and not n.startswith("mtp.")]
    if missing:
        raise KeyError(f"the state dict lacks {len(missing)} tensors, first {missing[0]}")
    return out
