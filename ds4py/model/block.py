"""A V4 transformer block: hyper-connection collapse -> norm -> attention -> expand, then the same
around the mixture of experts. The residual is `hc_mult` streams [T, hc, D] throughout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds4py.cache import LayerCache
from ds4py.model.attention import Attention
from ds4py.model.block_kernel import block_one
from ds4py.model.hc_kernel import ffn_one
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
    # `block_kernel.Plan` of the one-token call in one compiled call (made on first use, again if a plan changes)
    one_plan: object = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, cache: LayerCache,
                 pending: Pending | None = None) -> tuple[torch.Tensor, Pending]:
        if streams.shape[0] == 1:
            return self.run_one(streams, positions, token_ids, cache, pending)
        return self.run(streams, token_ids, lambda x: self.attn(x, positions, cache), pending)

    def run_one(self, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, cache: LayerCache,
                pending: Pending | None) -> tuple[torch.Tensor, Pending]:
        """`run` for one decoding token: after the attention's heads, its output projections, the ffn's collapse
        and the MoE in one compiled call (`hc_kernel.ffn_one`: the same calls' values) where they are compiled; the
        whole block in one compiled call (`block_kernel.block_one`: the same values again) where all its calls are."""
        done = block_one(self, streams, positions, token_ids, cache, pending)
        if done is not None:
            return done
        streams, x, post, comb = self.attn_input(streams, pending)
        heads = self.attn.heads(x, positions, cache)
        plans = self.attn.output_plan(), self.hc_ffn.plan_for(self.ffn_norm, self.eps), self.ffn.one_token_plan()
        if None not in plans:
            done = ffn_one(*plans, heads, streams, post, comb, self.ffn.router.hash_ids(token_ids))
            if done is not None:
                return done[0], done[1:]
        return self.ffn_half(self.attn.output(heads), streams, post, comb, token_ids)

    def decode_batch(self, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor,
                     caches: list[LayerCache], pending: Pending | None = None) -> tuple[torch.Tensor, Pending]:
        """One token of each of B sequences: streams [B, hc, D], one cache each."""
        return self.run(streams, token_ids, lambda x: self.attn.decode_batch(x, positions, caches), pending)

    def run(self, streams: torch.Tensor, token_ids: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
            pending: Pending | None = None) -> tuple[torch.Tensor, Pending]:
        """The block around `attend` (normed input [T, D] -> attention output [T, D]) -> (streams, pending): the
        ffn's output is left pending, not yet expanded into the streams; the next block expands it in the same
        compiled call as its own collapse, `complete` after the last. `pending` from the previous block comes in
        likewise (None: the streams are complete)."""
        streams, x, post, comb = self.attn_input(streams, pending)
        return self.ffn_half(attend(x), streams, post, comb, token_ids)

    def attn_input(self, streams: torch.Tensor, pending: Pending | None):
        """`pending` expanded into the streams (if any), then the attention's collapse, normed -> (streams, x, post,
        comb)."""
        if pending is None:
            return (streams, *self.hc_attn.collapse_normed(streams, self.attn_norm, self.eps))
        return self.hc_attn.expand_collapse_normed(pending[0], streams, pending[1], pending[2], self.attn_norm,
                                                   self.eps)

    def ffn_half(self, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 token_ids: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        """The attention's output [T, D] expanded into the streams, the ffn's collapse and the MoE -> (streams,
        the MoE's output pending with its post and comb)."""
        streams, x, post, comb = self.hc_ffn.expand_collapse_normed(out, streams, post, comb, self.ffn_norm, self.eps)
        return streams, (self.ffn(x, token_ids), post, comb)


# a sub-block's output [T, D] with the post [T, hc] and comb [T, hc, hc] that expand it into the residual streams
Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def complete(streams: torch.Tensor, pending: Pending | None) -> torch.Tensor:
    """The streams with a pending sub-block output expanded into them."""
    return streams if pending is None else HyperConnection.expand(pending[0], streams, pending[1], pending[2])
