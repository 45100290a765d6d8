"""A V4 transformer block: hyper-connection collapse -> norm -> attention -> expand, then the same
around the mixture of experts. The residual is `hc_mult` streams [T, hc, D] throughout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4py.cache import LayerCache
from ds4py.model.attention import Attention
from ds4py.model.hyper_connection import HyperConnection
from ds4py.model.moe import MoE


@dataclass
class Block:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    hc_attn: HyperConnection
    hc_ffn: HyperConnection
    attn: Attention
    ffn: MoE
    eps: float

    def __call__(
        self, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        return self.run(streams, token_ids, lambda x: self.attn(x, positions, cache))

    def decode_batch(self, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor,
                     caches: list[LayerCache]) -> torch.Tensor:
        """One token of each of B sequences: streams [B, hc, D], one cache each."""
        return self.run(streams, token_ids, lambda x: self.attn.decode_batch(x, positions, caches))

    def run(self, streams: torch.Tensor, token_ids: torch.Tensor,
            attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around `attend` (normed input [T, D] -> attention output [T, D])."""
        x, post, comb = self.hc_attn.collapse_normed(streams, self.attn_norm, self.eps)
        out = attend(x)
        streams, x, post, comb = self.hc_ffn.expand_collapse_normed(out, streams, post, comb, self.ffn_norm, self.eps)
        out = self.ffn(x, token_ids)
        return HyperConnection.expand(out, streams, post, comb)
