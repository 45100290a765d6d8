"""An MTP block read from a file of its own: llama.cpp writes V4 Flash's MTP block apart from the model
(`convert_hf_to_gguf.py --mtp`, an "mtp-*.gguf" that its `draft-mtp` speculative decoding reads), and the published
GGUFs leave it out. `attach_mtp` adds such a file's block to a model's WeightSource."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ds4py.errors import ModelFormatError
from ds4py.loaders import WeightSource

# what the MTP block's weights depend on: the two files must agree on these
MATCHING = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
            "o_groups", "o_lora_rank", "hc_mult", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "sliding_window", "qk_rope_head_dim")


def attach_mtp(source: WeightSource, path: str | Path) -> WeightSource:
    """`source` with the MTP block (`mtp.0.*`) of the file at `path` (llama.cpp's MTP file, or any model file
    holding the block) in place of its own, if any."""
    from ds4py.loaders.open import open_weights

    mtp = open_weights(path)
    names = [n for n in mtp.names() if n.startswith("mtp.0.")]
    if not names:
        raise ModelFormatError(f"{path}: holds no MTP block (mtp.0.* or blk.{mtp.config.num_hidden_layers}.nextn.*):"
                               " give llama.cpp's mtp-*.gguf for this model, or a GGUF converted with --mtp")
    a, b = source.config, mtp.config
    differ = [f"{k} {getattr(b, k)} against {getattr(a, k)}" for k in MATCHING if getattr(a, k) != getattr(b, k)]
    n = a.num_hidden_layers
    if len(b.compress_ratios) <= n:
        differ.append(f"no compress ratio for its layer {n}")
    if differ:
        raise ModelFormatError(f"{path}: its MTP block is not for {source.path}'s model ({'; '.join(differ[:3])}): "
                               "give the MTP file converted from the same checkpoint")
    config = replace(a, compress_ratios=list(a.compress_ratios[:n]) + list(b.compress_ratios[n:]),
                     num_nextn_predict_layers=max(a.num_nextn_predict_layers, 1))

    def merged(ours: dict, theirs: dict) -> dict:
        kept = {k: v for k, v in ours.items() if not k.startswith("mtp.")}
        return {**kept, **{k: v for k, v in theirs.items() if k.startswith("mtp.0.")}}

    metadata = dict(source.metadata)
    for key in ("tensor_nbytes", "tensor_kinds"):
        metadata[key] = merged(source.metadata.get(key, {}), mtp.metadata.get(key, {}))
    metadata["mtp_path"] = str(path)
    return replace(source, config=config, loaders=merged(source.loaders, mtp.loaders),
                   metadata=metadata, expert_readers=merged(source.expert_readers, mtp.expert_readers),
                   tensor_readers=merged(source.tensor_readers, mtp.tensor_readers))
