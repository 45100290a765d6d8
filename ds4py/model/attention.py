"""Attention of a V4 block: shared-KV multi-query attention (one KV head read as both key and value)
over the 128-token sliding window plus, on compressed layers, the compressor's entries (all visible
ones at ratio 128; the indexer's top-k at ratio 4), with a learned per-head sink logit, partial
interleaved RoPE undone on the output, and the grouped low-rank output projection."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4py.cache import LayerCache
from ds4py.formats import Weight, kernels
from ds4py.model import products, row_kernels
from ds4py.model.attention_kernel import attend_one, attend_rows
from ds4py.model.compressor import Compressor
from ds4py.model.indexer import Indexer
from ds4py.model.norms import rms_norm, unweighted_rms_norm
from ds4py.model.rope import Rotary, rotate
from ds4py.model.sliding_window import WindowBlocks

ATTENTION_BUDGET = 1 << 24  # float32 logits of a prefill chunk's queries held at once (64 MiB)


@dataclass
class Attention:
    wq_a: Weight            # [q_lora_rank, D]
    q_norm: torch.Tensor    # [q_lora_rank]
    wq_b: Weight            # [heads * head_dim, q_lora_rank]
    wkv: Weight             # [head_dim, D]
    kv_norm: torch.Tensor   # [head_dim]
    wo_a: Weight            # [o_groups * o_lora_rank, heads * head_dim / o_groups]
    wo_b: Weight            # [D, o_groups * o_lora_rank]
    sinks: torch.Tensor     # [heads]
    n_heads: int
    head_dim: int
    o_groups: int
    window: int
    eps: float
    rotary: Rotary
    compressor: Compressor | None = None
    indexer: Indexer | None = None
    # (the weights it was made from, kernels.ProjectPlan or None): `project_one`'s plan, made again if one changes
    plan: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # (wo_a, wo_b, kernels.OutputPlan or None): `output`'s one-token plan, made again if one changes
    out_plan: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """x [T, D] at absolute `positions` [T] (consecutive) -> [T, D]; updates `cache`."""
        return self.output(self.heads(x, positions, cache))

    def heads(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """`__call__` before the output projections: the heads' outputs [T, H, hd]."""
        q_residual, q, kv, rot = self.project(x, positions)
        return self.attend(x, q_residual, q, kv, positions, rot, cache)

    def decode_batch(self, x: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """One new token of each of B sequences: x [B, D] at positions [B] -> [B, D]. The projections
        read each weight once for all B; the attention itself runs per sequence over its own cache."""
        q_residual, q, kv, rot = self.project(x, positions)
        outs = [self.attend(x[i:i + 1], q_residual[i:i + 1], q[i:i + 1], kv[i:i + 1], positions[i:i + 1],
                            rot[i:i + 1], cache) for i, cache in enumerate(caches)]
        return self.output(torch.cat(outs))

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """-> q_residual [T, q_lora], q [T, H, hd] and kv [T, hd] (normed and rotated), the rotation."""
        T, H, hd = x.shape[0], self.n_heads, self.head_dim
        rot = self.rotary.rotation(positions)  # [T, rope_dim // 2] complex
        if T == 1:  # decoding: the projections, norms and rotation in one compiled call where the weights allow
            done = self.project_one(x, rot)
            if done is not None:
                q_residual, qkv = done
                return q_residual, qkv[:, :H], qkv[:, H], rot
        q_residual = rms_norm(self.wq_a.linear(x), self.q_norm, self.eps)
        q, kv = self.wq_b.linear(q_residual), self.wkv.linear(x)  # [T, H * hd], [T, hd]
        qkv = row_kernels.qkv_rows(q, kv, H, self.kv_norm, self.eps, rot)  # the norms and rotation in one call
        if qkv is None:
            q = unweighted_rms_norm(q.view(T, H, hd), self.eps)
            kv = rms_norm(kv, self.kv_norm, self.eps)
            qkv = rotate(torch.cat([q, kv.unsqueeze(1)], dim=1), rot)  # [T, H + 1, hd]: one rotation for both
        return q_residual, qkv[:, :H], qkv[:, H].contiguous(), rot

    def project_one(self, x: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`project` of one token in one call (`kernels.project_one`: the same values) when wq_a, wq_b and wkv are
        matrices the CPU kernels multiply from their blocks -> (q_residual [1, q_lora], qkv [1, H + 1, hd]), or None."""
        plan = self.project_plan()
        return None if plan is None else kernels.project_one(plan, x, rot)

    def project_plan(self) -> kernels.ProjectPlan | None:
        """`project_one`'s plan (made again if a weight was replaced), or None."""
        made_from = (self.wq_a, self.q_norm, self.wq_b, self.wkv, self.kv_norm)
        if self.plan is None or any(a is not b for a, b in zip(self.plan[0], made_from)):
            rows = [kernels.plan_rows(w) for w in (self.wq_a, self.wq_b, self.wkv)]
            plan = None if any(r is None for r in rows) else kernels.project_plan(
                rows[0], self.q_norm, rows[1], rows[2], self.kv_norm, self.n_heads, self.head_dim, self.eps)
            self.plan = (made_from, plan)
        return self.plan[1]

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """[T, H, hd] attention output -> [T, D]."""
        if out.shape[0] == 1:  # decoding: both projections in one compiled call where the weights allow
            plan = self.output_plan()
            if plan is not None:
                y = kernels.output_one(plan, out)
                if y is not None:
                    return y
        return self.wo_b.linear(self.grouped_wo_a(out))

    def output_plan(self) -> kernels.OutputPlan | None:
        """The one-token output projections' plan (made again if a weight was replaced), or None."""
        plan = self.out_plan
        if plan is None or plan[0] is not self.wo_a or plan[1] is not self.wo_b:
            rows = kernels.plan_rows(self.wo_a), kernels.plan_rows(self.wo_b)
            plan = self.out_plan = (self.wo_a, self.wo_b, None if None in rows else kernels.output_plan(
                *rows, self.o_groups, self.n_heads * self.head_dim))
        return plan[2]

    def attend(self, x, q_residual, q, kv, positions, rot, cache: LayerCache) -> torch.Tensor:
        """The attention of T consecutive tokens of one sequence over its cache -> [T, H, hd]."""
        if x.shape[0] == 1:
            return self.attend_one(x, q_residual, q, kv, positions, rot, cache)
        T, H, hd = x.shape[0], self.n_heads, self.head_dim
        keys = self.update_window(kv, cache)  # [S, hd]: the cached window, then the chunk's T
        entries = top = None
        per_row = H * (self.window + 16)  # logits of a query: its window block's slots ...
        if self.compressor is not None:
            entries = self.compressor(x, cache.compressor)  # [n, hd]
            if self.indexer is not None:
                top = self.indexer(x, q_residual, positions, cache.indexer)  # [T, k]
                per_row = max(per_row + H * top.shape[1], top.shape[1] * hd)  # ... + top-k (and their keys)
            else:
                per_row += H * entries.shape[0]  # ... + every entry (ratio 128: 8192 of them at 1M tokens)
        visible = None if entries is None or top is not None else (positions + 1) // self.compressor.ratio
        out = attend_rows(q, keys, self.window, entries, top, visible, self.sinks, hd**-0.5, rot.conj())
        if out is not None:  # small heads: one compiled call
            return out
        # a long prompt's queries go in blocks of at most ATTENTION_BUDGET logits (each row's are the same)
        rows = max(16, ATTENTION_BUDGET // per_row)
        S = keys.shape[0]
        outs = [self.attend_rows(q[r0:r0 + rows], keys[:S - T + min(T, r0 + rows)], positions[r0:r0 + rows],
                                 entries, None if top is None else top[r0:r0 + rows]) for r0 in range(0, T, rows)]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return rotate(out, rot.conj())  # undo the rotation V picked up (K = V)

    def attend_rows(self, q, keys, positions, entries, top) -> torch.Tensor:
        """R consecutive queries q [R, H, hd] at `positions`, the last R of `keys` [S, hd] their own (before them
        the window's), over their window, the compressed `entries` [n, hd] (ratio 128: those closed before each
        query) or their indexer's `top` [R, k] of them (ratio 4) and the sink -> [R, H, hd], still rotated."""
        R, H, hd = q.shape[0], self.n_heads, self.head_dim
        window = WindowBlocks.make(keys, R, self.window)  # each query sees only its own `window` keys
        scale = hd**-0.5
        logits = [window.logits(q).float().mul_(scale).masked_fill_(window.hidden, float("-inf"))]  # [R, H, L]
        if top is not None:
            chosen = entries[top.clamp(min=0)]  # [R, k, hd]
            c_logits = products.einsum("thd,tkd->thk", q, chosen).float() * scale
            logits.append(c_logits.masked_fill_((top < 0)[:, None, :], float("-inf")))
        elif entries is not None:
            visible = (positions + 1) // self.compressor.ratio
            closed = torch.arange(entries.shape[0], device=q.device)[None, :] < visible[:, None]
            c_logits = products.einsum("thd,nd->thn", q, entries).float() * scale
            logits.append(c_logits.masked_fill_(~closed[:, None, :], float("-inf")))
        logits.append(self.sinks.float().view(1, H, 1).expand(R, H, 1))
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1).to(q.dtype)  # [R, H, L + C + 1]
        L = logits[0].shape[-1]
        out = window.values(probs[..., :L])  # [R, H, hd]
        if top is not None:
            out = out + products.einsum("thk,tkd->thd", probs[..., L:-1], chosen)
        elif entries is not None:
            out = out + products.einsum("thn,nd->thd", probs[..., L:-1], entries)
        return out

    def attend_one(self, x, q_residual, q, kv, positions, rot, cache: LayerCache) -> torch.Tensor:
        """`attend` for one token (T = 1): every cached window key and every compressed entry
        (all closed, as the indexer's top-k are) is visible, so no masks; the keys and the entries
        are one [S + C, hd] matrix read by two plain matmuls."""
        H, hd = self.n_heads, self.head_dim
        keys = self.update_window(kv, cache)  # [S, hd]
        entries = top = None
        if self.compressor is not None:
            entries = self.compressor(x, cache.compressor)  # [n, hd]
            if self.indexer is not None:
                top = self.indexer(x, q_residual, positions, cache.indexer)[0]  # [k], none -1 at T = 1
        out = attend_one(q.view(H, hd), keys, entries, top, self.sinks, hd**-0.5, rot.conj())  # small: one call
        if out is not None:
            return out
        if entries is not None:
            keys = torch.cat([keys, entries if top is None else entries[top]])  # [S + C, hd]
        logits = products.mm(q.view(H, hd), keys.T).float().mul_(hd**-0.5)  # [H, S + C]
        probs = torch.softmax(torch.cat([logits, self.sinks.view(H, 1)], dim=-1), dim=-1).to(x.dtype)
        out = products.mm(probs[:, :-1], keys).view(1, H, hd)
        return rotate(out, rot.conj())  # undo the rotation V picked up (K = V)

    def update_window(self, kv: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """kv [T, hd] -> the keys [S, hd] these T tokens attend over (cached window, then kv); keeps
        the last `window - 1` in `cache.window`."""
        if kv.shape[0] == 1 and self.window > 1:
            return self.append_window(kv, cache)
        keys = kv if cache.window is None else torch.cat([cache.window, kv])  # [S, hd]
        cache.window = keys[-(self.window - 1):] if self.window > 1 else keys[:0]
        cache.last_keys = (keys, self.window - 1)  # `LayerCache.drop_last`'s
        return keys

    def append_window(self, kv: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """`update_window` for one decoding token without a new window per token: the window is a view of rows
        [start, end) of `cache.window_rows` [2 * window, hd], kv is written at row end and the keys are rows
        [start, end] (the same values as the concatenation); when the rows run out, the window's last
        `window - 1` move to the front (once every `window` tokens). A window from elsewhere (a prompt's
        concatenation) is copied in first."""
        keys = self.window_slot(kv.dtype, kv.shape[1], cache)
        keys[-1] = kv[0]
        return keys

    def window_slot(self, dtype: torch.dtype, hd: int, cache: LayerCache) -> torch.Tensor:
        """`append_window`'s window moves, before the new key is known -> the keys [S, hd] it attends over, their
        last row the one the new key is to be written into (window > 1). A full window takes views made once with
        the rows (no new views a token)."""
        W, rows, win, at = self.window, cache.window_rows, cache.window, cache.window_at
        if at is not None and win is at[0] and rows.dtype == dtype:  # the window this call made last time
            start, n = at[1], win.shape[0]
            if start + n == rows.shape[0]:  # n <= W - 1 < start: the rows do not overlap
                rows[:n] = win
                start = 0
        else:
            rows = cache.window_rows = torch.empty(2 * W, hd, dtype=dtype, device=self.sinks.device)
            cache.window_views = [(rows[s:s + W], rows[s + 1:s + W]) for s in range(W + 1)]
            start, n = 0, 0 if win is None else win.shape[0]
            if n:
                rows[:n] = win
        if n == W - 1:
            keys, cache.window = cache.window_views[start]
            cache.window_at = (cache.window, start + 1)
        else:  # fewer keys than a window: they are all the next window
            keys = cache.window = rows[start:start + n + 1]
            cache.window_at = (keys, start)
        return keys

    def grouped_wo_a(self, out: torch.Tensor) -> torch.Tensor:
        """[T, H, hd] -> [T, o_groups * o_lora_rank]: each group of heads has its own projection."""
        T, g = out.shape[0], self.o_groups
        if hasattr(self.wo_a, "rows"):  # packed: each group's rows multiply straight from their blocks
            x = out.reshape(T, g, -1)
            rows = self.wo_a.kernel_rows()
            if rows is not None:  # all groups in one compiled call (decode: one instead of o_groups)
                y = kernels.ggml_grouped_linear(x, *rows)
                if y is not None:
                    return y
            r = self.wo_a.shape[0] // g
            return torch.cat([self.wo_a.rows(i * r, (i + 1) * r).linear(x[:, i]) for i in range(g)], dim=-1)
        w = self.wo_a.dequantize(out.dtype)  # [g * o_lora, in_g]
        w = w.view(g, -1, w.shape[-1])
        return products.einsum("tgi,goi->tgo", out.reshape(T, g, -1), w).reshape(T, -1)
