"""The lightning indexer of ratio-4 (CSA) layers: scores every compressed entry for every query with
`sum_h w[t, h] * relu(q[t, h] . k[s])` over its own small compressed keys, and keeps the top
`index_topk` entries that the query may see (entries whose window closed at or before it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4py.cache import CompressorState
from ds4py.formats import Weight, kernels
from ds4py.model.compressor import Compressor
from ds4py.model.indexer_kernel import index_rows
from ds4py.model.rope import Rotary, rotate

SCORE_BUDGET = 1 << 24  # float32 scores held at once in prefill (64 MiB)


@dataclass
class Indexer:
    wq_b: Weight          # [n_heads * head_dim, q_lora_rank]
    weights_proj: Weight  # [n_heads, D]
    compressor: Compressor
    n_heads: int
    head_dim: int
    topk: int
    rotary: Rotary
    # (wq_b, weights_proj, their kernels.matrix pair or None): `query`'s one-token plan, made again if one changes
    plan: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(
        self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor, state: CompressorState
    ) -> torch.Tensor:
        """-> [T, k] indices into the attention compressor's entries, -1 where a query has fewer
        than k visible entries."""
        keys = self.compressor(x, state)  # [n, head_dim]
        T, n = x.shape[0], keys.shape[0]
        k = min(self.topk, n)
        if k == 0:
            return torch.empty(T, 0, dtype=torch.long, device=x.device)
        q, w = self.query(x, q_residual, positions)  # [T, heads, head_dim] rotated, [T, heads] float32
        scale = self.head_dim**-0.5
        if T == 1:  # one token sees every entry emitted so far
            done = index_rows(q, w, keys, None, scale, k)  # one query seeing every entry
            return done[0] if done is not None else stable_topk(self.totals(q, w, keys.float().T), k)
        visible = (positions + 1) // self.compressor.ratio  # entries [0, visible) are closed
        # the compiled scores are [queries, n] (no heads dimension), torch's [queries * heads, n]: V4 Flash at 128K
        # tokens, 2 GiB for a 256-token chunk, so the queries go in blocks of at most SCORE_BUDGET scores (each
        # row's sums are the same either way)
        compiled_rows = max(1, SCORE_BUDGET // n)
        tops = []
        for r0 in range(0, T, compiled_rows):
            done = index_rows(q[r0:r0 + compiled_rows], w[r0:r0 + compiled_rows], keys,
                              visible[r0:r0 + compiled_rows], scale, k)
            if done is None:
                break
            tops.append(done[0])
        else:
            return torch.cat(tops) if len(tops) > 1 else tops[0]  # -1 past what a query sees
        keys_t = keys.float().T  # [head_dim, n]
        rows = max(1, SCORE_BUDGET // (self.n_heads * n))
        tops = []
        for r0 in range(0, T, rows):
            total = self.totals(q[r0:r0 + rows], w[r0:r0 + rows], keys_t)  # [rows, n]
            future = torch.arange(n, device=x.device)[None, :] >= visible[r0:r0 + rows, None]
            tops.append(stable_topk(total.masked_fill_(future, float("-inf")), k))
        top = torch.cat(tops) if len(tops) > 1 else tops[0]
        return torch.where(top >= visible[:, None], -1, top)

    def query(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor):
        """-> the queries [T, heads, head_dim] (rotated) and the head weights [T, heads] float32; one compiled call
        for a decoding token where the weights allow (`kernels.index_query_one`)."""
        T = x.shape[0]
        rotation = self.rotary.rotation(positions)
        if T == 1:
            mats = self.query_plan()
            if mats is not None:
                (wq, _), (wp, _) = mats
                done = kernels.index_query_one(q_residual, x, wq, wp, self.n_heads, self.head_dim, rotation,
                                               self.n_heads**-0.5)
                if done is not None:
                    return done
        q = rotate(self.wq_b.linear(q_residual).view(T, self.n_heads, self.head_dim), rotation)
        return q, self.weights_proj.linear(x).float().mul_(self.n_heads**-0.5)

    def query_plan(self) -> tuple | None:
        """The one-token query's (kernels.matrix of wq_b, of weights_proj) (made again if one changes), or None."""
        plan = self.plan
        if plan is None or plan[0] is not self.wq_b or plan[1] is not self.weights_proj:
            mats = kernels.matrix(self.wq_b), kernels.matrix(self.weights_proj)
            plan = self.plan = (self.wq_b, self.weights_proj, None if None in mats else mats)
        return plan[2]

    def totals(self, q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
        """q [R, heads, head_dim], w [R, heads], keys_t [head_dim, n] -> sum_h w * relu(q_h . k) / sqrt(head_dim)
        [R, n]."""
        R, n = q.shape[0], keys_t.shape[1]
        scores = (q.reshape(R * self.n_heads, -1).float() @ keys_t).clamp_(min=0)  # relu [R * heads, n]
        scores = scores.view(R, self.n_heads, n).mul_(self.head_dim**-0.5)
        return torch.bmm(w.unsqueeze(1), scores).squeeze(1)


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """values [T, n] float32 -> indices [T, k] of the k largest per row, largest first, ties broken
    towards the earlier entry: what a stable descending sort's first k are. Ties are common (entries
    whose every head scores <= 0 tie at exactly 0), and breaking them by position is what makes
    chunked prefill, decode and one full pass choose the same entries. Each value becomes one int64
    key, its float order in the high 32 bits and the reversed position in the low ones, so a plain
    (unstable) top-k of distinct keys gives that order: a partial selection, not a sort of all n."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0: they are equal floats
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order = float order
    reversed_pos = 0xFFFFFFFF - torch.arange(values.shape[-1], device=values.device)
    return ((ordered << 32) | reversed_pos).topk(k, dim=-1).indices
