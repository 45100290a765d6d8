"""Random weights for tests and synthetic models, under the canonical names, from a fixed seed.

Scales keep activations O(1) through many layers so that top-k choices (routing, the indexer) are
well separated and parity tests are not decided by rounding.
"""

from __future__ import annotations

import torch

from ds4py.config import ModelConfig
from ds4py.loaders.names import expected_shapes


def random_tensor(name: str, shape: tuple[int, ...], config: ModelConfig, g: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    if name.endswith("tid2eid"):
        vocab, k = shape
        return torch.rand(vocab, config.n_routed_experts, generator=g).argsort(dim=-1)[:, :k].to(torch.int32)
    if name.endswith(("norm.weight",)):
        return 1.0 + normal(0.1)
    if name.endswith(("hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
        return 0.5 + torch.rand(shape, generator=g)
    if name.endswith(("_base",)):
        return normal(0.5)
    if name.endswith(("hc_attn_fn", "hc_ffn_fn", "hc_head_fn")):
        return normal(0.3 / shape[-1] ** 0.5)
    if name.endswith("attn_sink"):
        return normal(1.0)
    if name.endswith(".ape"):
        return normal(0.5)
    if name.endswith("gate.bias"):
        return normal(0.1)
    if name.endswith("embed.weight"):
        return normal(1.0)
    # linear weights [.., out, in]
    return normal(1.0 / shape[-1] ** 0.5)


def random_weights(config: ModelConfig, seed: int = 0, mtp: bool = True) -> dict[str, torch.Tensor]:
    """float32 (int32 for tid2eid) tensors for every canonical name of `config`."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: random_tensor(name, shape, config, g) for name, shape in expected_shapes(config, mtp=mtp).items()
    }
