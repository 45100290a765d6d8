"""ModelConfig: the hyper-parameters of a DeepSeek V4 model, under the official config.json names.

The official checkpoint's config.json is the source of truth for names. The transformers layout
(`layer_types`, `mlp_layer_types`, nested `rope_parameters`) and GGUF metadata are folded into it
by `from_dict` and `ds4py.loaders.gguf`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ds4py.errors import ModelFormatError

ARCHITECTURES = ("DeepseekV4ForCausalLM",)
LAYER_TYPE_TO_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # one entry per layer (0 = sliding window only, 4 = CSA with indexer, 128 = HCA); the official
    # config carries extra trailing entries for the MTP layers.
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # YaRN parameters, applied to the compressed (ratio 4 and 128) layers only
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # --- derived facts -------------------------------------------------------------------------
    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters when rope_scaling asks for YaRN, else None."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        return rs if kind == "yarn" else None

    def validate(self) -> None:
        problems = []
        if len(self.compress_ratios) < self.num_hidden_layers:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries, fewer than "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if any(r < 0 or r == 1 for r in self.compress_ratios):
            problems.append(f"compress_ratios entries must be 0 or >= 2, got {self.compress_ratios}")
        if self.head_dim % 2 or self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and <= head_dim={self.head_dim}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            problems.append(f"o_groups={self.o_groups} must divide heads*head_dim")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if self.scoring_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            problems.append(f"scoring_func {self.scoring_func!r} is not one of sqrtsoftplus, softmax, sigmoid")
        if problems:
            raise ModelFormatError("invalid model config: " + "; ".join(problems))

    # --- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Build from an official or transformers-layout config.json dict; unknown keys are ignored."""
        d = dict(raw)
        if "text_config" in d and isinstance(d["text_config"], dict):
            d = {**d, **d["text_config"]}
        archs = d.get("architectures")
        if archs and not set(archs) & set(ARCHITECTURES):
            raise ModelFormatError(
                f"unsupported architecture {archs}: ds4py runs DeepSeek V4 ({', '.join(ARCHITECTURES)})"
            )
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        if "compress_ratios" not in d and d.get("layer_types"):
            d["compress_ratios"] = [LAYER_TYPE_TO_RATIO[t] for t in d["layer_types"]]
            rates = d.get("compress_rates") or {}
            d["compress_ratios"] = [
                rates.get(t, r) if r else 0 for t, r in zip(d["layer_types"], d["compress_ratios"])
            ]
        if "num_hash_layers" not in d and d.get("mlp_layer_types"):
            d["num_hash_layers"] = sum(1 for t in d["mlp_layer_types"] if t == "hash_moe")
        if "qk_rope_head_dim" not in d and d.get("partial_rotary_factor"):
            d["qk_rope_head_dim"] = int(d.get("head_dim", cls.head_dim) * d["partial_rotary_factor"])
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
            comp = rp["compress"]
            d.setdefault("compress_rope_theta", comp.get("rope_theta", cls.compress_rope_theta))
            if isinstance(rp.get("main"), dict):
                d.setdefault("rope_theta", rp["main"].get("rope_theta", cls.rope_theta))
            if comp.get("rope_type") == "yarn" and "rope_scaling" not in d:
                d["rope_scaling"] = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "rope_scaling" in d and d["rope_scaling"] is None:
            d["rope_scaling"] = None
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("num_hidden_layers", n)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: config.json not found; a model directory needs one") from None
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The official config.json form."""
        d = dataclasses.asdict(self)
        d["architectures"] = list(ARCHITECTURES)
        d["model_type"] = "deepseek_v4"
        d["num_key_value_heads"] = 1
        return d

    def to_transformers_dict(self) -> dict:
        """Keyword arguments for transformers' DeepseekV4Config (used by the parity tests)."""
        n = self.num_hidden_layers
        types, rates = [], {}
        for r in self.compress_ratios[:n]:
            t = {0: "sliding_attention", 4: "compressed_sparse_attention"}.get(r, "heavily_compressed_attention")
            types.append(t)
            if r:
                rates[t] = r
        rope_scaling = dict(self.yarn) if self.yarn else {}
        rope_scaling.pop("type", None)
        if rope_scaling:
            rope_scaling["rope_type"] = "yarn"
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=1,
            head_dim=self.head_dim,
            q_lora_rank=self.q_lora_rank,
            partial_rotary_factor=self.qk_rope_head_dim / self.head_dim,
            num_experts_per_tok=self.num_experts_per_tok,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            scoring_func=self.scoring_func,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            compress_rope_theta=self.compress_rope_theta,
            rope_parameters=rope_scaling or None,
            layer_types=types,
            compress_rates={
                "compressed_sparse_attention": rates.get("compressed_sparse_attention", 4),
                "heavily_compressed_attention": rates.get("heavily_compressed_attention", 128),
            },
            mlp_layer_types=["hash_moe" if i < self.num_hash_layers else "moe" for i in range(n)],
            hc_mult=self.hc_mult,
            hc_sinkhorn_iters=self.hc_sinkhorn_iters,
            hc_eps=self.hc_eps,
            swiglu_limit=self.swiglu_limit,
            sliding_window=self.sliding_window,
            o_groups=self.o_groups,
            o_lora_rank=self.o_lora_rank,
            index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim,
            index_topk=self.index_topk,
            num_nextn_predict_layers=self.num_nextn_predict_layers,
            rms_norm_eps=self.rms_norm_eps,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            tie_word_embeddings=False,
        )


def tiny_config(**overrides) -> ModelConfig:
    """A tiny config with every feature on: all three attention types, hash and routed MoE layers,
    index_topk smaller than the compressed entries of a few hundred tokens. Used by tests."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        compress_ratios=[0, 4, 128, 4, 0],
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=4096,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=3,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_hash_layers=1,
        swiglu_limit=10.0,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        num_nextn_predict_layers=1,
    )
    base.update(overrides)
    return ModelConfig(**base)

