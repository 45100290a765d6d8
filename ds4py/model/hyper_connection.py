"""Manifold-constrained hyper-connections (mHC): the residual is `hc_mult` parallel streams
[T, hc, D]. Before each sub-block the streams are collapsed with weights `pre`; after it the output is
expanded with `post` and the streams are mixed by `comb`, projected onto the doubly-stochastic
matrices by Sinkhorn-Knopp."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4py.model.hc_kernel import (
    HcPlan,
    hc_collapse,
    hc_expand,
    hc_expand_collapse,
    hc_head,
    hc_plan,
    hc_weights,
)
from ds4py.model.norms import rms_norm, unweighted_rms_norm


@dataclass
class HyperConnection:
    fn: torch.Tensor     # [(2 + hc) * hc, hc * D] float32
    base: torch.Tensor   # [(2 + hc) * hc]
    scale: torch.Tensor  # [3]: pre, post, comb
    hc: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    # (the norm weight, its eps, hc_kernel.HcPlan or None): `expand_collapse_normed`'s, made again for another
    # weight
    plan: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [T, hc, D] -> pre [T, hc], post [T, hc], comb [T, hc, hc] (float32)."""
        hc = self.hc
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        mix = flat @ self.fn.T  # [T, (2 + hc) * hc]
        compiled = hc_weights(mix, self.base, self.scale, hc, self.sinkhorn_iters, self.hc_eps)
        if compiled is not None:
            return compiled
        return self.weights_torch(mix)

    def weights_torch(self, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same from the projection `mix`, in torch ops (the reference for the compiled loop)."""
        hc = self.hc
        pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = comb_w.view(-1, hc, hc) * self.scale[2] + comb_b.view(hc, hc)
        comb = torch.softmax(comb, dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        return pre, post, comb

    def collapse(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> block input [T, D], post, comb."""
        fused = hc_collapse(streams, self.fn, self.base, self.scale, self.sinkhorn_iters, self.hc_eps, self.norm_eps)
        if fused is not None:
            return fused
        pre, post, comb = self.weights(streams)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return collapsed, post, comb

    def collapse_normed(self, streams: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`collapse`, then the block's rms_norm(x, weight, eps) -> (normed x, post, comb); one compiled call for
        both where they are compiled (decoding), the same values."""
        fused = hc_collapse(streams, self.fn, self.base, self.scale, self.sinkhorn_iters, self.hc_eps, self.norm_eps,
                            norm=(weight, eps))
        if fused is not None:
            return fused
        x, post, comb = self.collapse(streams)
        return rms_norm(x, weight, eps), post, comb

    def expand_collapse_normed(self, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
                               comb: torch.Tensor, weight: torch.Tensor, eps: float,
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The previous sub-block's `expand` (its post and comb), then this connection's `collapse_normed` ->
        (streams, normed x, post, comb); one compiled call where both are compiled (decoding), the same values."""
        plan = self.plan_for(weight, eps)
        fused = None if plan is None else hc_expand_collapse(plan, out, streams, post, comb)
        if fused is not None:
            return fused
        streams = HyperConnection.expand(out, streams, post, comb)
        return (streams, *self.collapse_normed(streams, weight, eps))

    def plan_for(self, weight: torch.Tensor, eps: float) -> HcPlan | None:
        """`expand_collapse_normed`'s compiled plan for this norm (the parameters checked once), or None."""
        plan = self.plan
        if plan is None or plan[0] is not weight or plan[1] != eps:
            plan = self.plan = (weight, eps, hc_plan(self.fn, self.base, self.scale, self.hc, self.sinkhorn_iters,
                                                     self.hc_eps, self.norm_eps, (weight, eps)))
        return plan[2]

    @staticmethod
    def expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """out [T, D], streams [T, hc, D] -> new streams: post_k * out + sum_j comb[j, k] * streams_j."""
        fused = hc_expand(out, streams, post, comb)
        return fused if fused is not None else HyperConnection.expand_torch(out, streams, post, comb)

    @staticmethod
    def expand_torch(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """`expand` in torch ops (without a compiler; the reference for the compiled one)."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


@dataclass
class HyperHead:
    """The final collapse of the streams into one hidden state, before the output norm."""

    fn: torch.Tensor     # [hc, hc * D]
    base: torch.Tensor   # [hc]
    scale: torch.Tensor  # [1]
    hc_eps: float
    norm_eps: float

    def normed(self, streams: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The collapse, then the output rms_norm(x, weight, eps): one compiled call where it applies (decoding),
        the values of the two up to float32 summation order."""
        fused = hc_head(streams, self.fn, self.base, self.scale, self.hc_eps, self.norm_eps, weight, eps)
        return fused if fused is not None else rms_norm(self(streams), weight, eps)

    def __call__(self, streams: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        pre = torch.sigmoid((flat @ self.fn.T) * self.scale + self.base) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
