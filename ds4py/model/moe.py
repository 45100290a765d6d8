"""The mixture of experts: a router (sqrt-softplus scores; top-k with a selection-only bias, or a
fixed token-id -> experts table `tid2eid` in the first `num_hash_layers` layers), routed experts and
shared experts, all clamped SwiGLU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from ds4py.formats import Weight, gpu_kernels, kernels, small_gemm

SCORE_FUNCS = {
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: x.softmax(dim=-1),
}


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


@dataclass
class Router:
    weight: torch.Tensor           # [experts, D] float32
    bias: torch.Tensor | None      # [experts]: shifts the selection, not the weights
    tid2eid: torch.Tensor | None   # [vocab, top_k]: hash routing
    top_k: int
    score_func: str
    scaling: float

    def __call__(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k] float32, expert ids [T, k]; ascending per token where compiled)."""
        logits = kernels.f32_linear(x, self.weight)
        hash_ids = self.hash_ids(token_ids)
        routed = kernels.route(logits, self.bias, self.score_func, self.top_k, self.scaling, hash_ids)
        if routed is not None:  # the code `MoE.whole_one` routes decode tokens with
            return routed
        scores = SCORE_FUNCS[self.score_func](logits)
        if hash_ids is not None:
            ids = hash_ids.long()
        else:
            biased = scores if self.bias is None else scores + self.bias
            ids = biased.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def hash_ids(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """The hash-routed layers' experts of each token [T, k] (`tid2eid`), or None for a routed layer."""
        return None if self.tid2eid is None else self.tid2eid[token_ids]


@dataclass
class MoE:
    router: Router
    w1: Weight  # [experts, inter, D] gate
    w2: Weight  # [experts, D, inter] down
    w3: Weight  # [experts, inter, D] up
    shared: tuple[Weight, Weight, Weight] | None
    swiglu_limit: float
    # streaming with read-ahead: told (x, ids, token_ids) once routed, before the experts run
    read_ahead: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    # (the weights it was made from, kernels.MoEPlan or None): `whole_one`'s plan, made again if a weight changes
    plan: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # (the weights it was made from, small_gemm.PackedMoE or None): `small_experts`
    small: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = self.whole_one(x, token_ids)
            if out is not None:
                return out
        weights, ids = self.router(x, token_ids)
        if self.read_ahead is not None:
            self.read_ahead(x, ids, token_ids)
        if x.shape[0] <= gpu_kernels.GEMV_MAX_T:
            out = self.by_id(x, weights, ids)
            if out is not None:
                return out
        fused = self.fused_one(x, weights, ids) if x.shape[0] == 1 else self.fused_many(x, weights, ids)
        if fused is not None:
            return fused
        out = self.routed_one(x, weights, ids) if x.shape[0] == 1 else self.routed(x, weights, ids)
        return self.add_shared(x, out)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.w2.expert(e).linear(
            swiglu(self.w1.expert(e).linear(h), self.w3.expert(e).linear(h), self.swiglu_limit)
        )

    def whole_one(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor | None:
        """One token through the router, its routed experts (ascending id) and the shared ones in one compiled call
        (`kernels.moe_one`: the values of `router` then `fused_one`), when the expert stacks are resident in a
        format the CPU kernels multiply from its blocks; else None."""
        plan = self.one_token_plan()
        if plan is None:
            return None
        done = kernels.moe_one(plan, x, self.router.hash_ids(token_ids))
        return None if done is None else done[0]

    def one_token_plan(self) -> kernels.MoEPlan | None:
        """The plan `whole_one` runs a token with (None where it would not: no plan, or read-ahead is on)."""
        return self.current_plan() if self.read_ahead is None else None

    def current_plan(self) -> kernels.MoEPlan | None:
        """The compiled calls' plan of this MoE (made again if a weight was replaced), or None."""
        made_from = (self.router.weight, self.router.bias, self.w1, self.w2, self.w3, self.shared)
        if self.plan is None or any(a is not b for a, b in zip(self.plan[0], made_from)):
            self.plan = (made_from, self.make_plan())
        return self.plan[1]

    def make_plan(self) -> kernels.MoEPlan | None:
        stacks = [kernels.plan_rows(w) for w in (self.w1, self.w3, self.w2)]
        shared = []
        if self.shared is not None:
            w1, w2, w3 = self.shared
            shared.append(tuple(kernels.plan_rows(w) for w in (w1, w3, w2)))
        if any(r is None for r in stacks) or any(r is None for trio in shared for r in trio):
            return None
        r = self.router
        return kernels.moe_plan(r.weight, r.bias, r.score_func, r.top_k, r.scaling, stacks, shared,
                                self.swiglu_limit)

    def by_id(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """A few tokens' routed experts on a GPU: each (token, expert) pair's three products from the resident stacks,
        the matrices chosen by `ids` on the device (`gpu_kernels.stack_linear`: no host sync, one call per matrix
        kind), rounded to x's dtype where `routed_one` rounds; then the shared experts. None unless the stacks are
        Q8_0 / MXFP4 on the device the kernels run on."""
        stacks = [w.stack_rows() for w in (self.w1, self.w3, self.w2)]
        if any(s is None or s[1] not in gpu_kernels.BLOCK_BYTES for s in stacks):
            return None
        (r1, q1), (r3, q3), (r2, q2) = stacks
        if not gpu_kernels.takes(x, ids, r1, r3, r2):
            return None
        T, k = ids.shape
        pairs = ids.reshape(-1)  # [T * k]: pair p is token p // k
        gate = gpu_kernels.stack_linear(x, r1, q1, pairs, x_div=k).to(x.dtype)  # [T * k, inter]
        up = gpu_kernels.stack_linear(x, r3, q3, pairs, x_div=k).to(x.dtype)
        h = swiglu(gate, up, self.swiglu_limit)
        down = gpu_kernels.stack_linear(h, r2, q2, pairs).to(x.dtype)  # [T * k, D]
        out = (down * weights.reshape(-1, 1).to(x.dtype)).reshape(T, k, -1).sum(dim=1)
        return self.add_shared(x, out)

    def fused_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """One token's routed experts (ascending id) and shared experts in one compiled call, when every matrix
        is one the CPU kernels multiply from its blocks (GGUF Q8_0 / MXFP4) or plain bf16 / float32 rows; else None."""
        if not x.is_cpu:
            return None
        chosen = sorted(zip(ids[0].tolist(), weights[0].tolist()))
        mats = [(self.w1.expert(e), self.w3.expert(e), self.w2.expert(e)) for e, _ in chosen]
        scales = [w for _, w in chosen]
        if self.shared is not None:
            w1, w2, w3 = self.shared
            mats.append((w1, w3, w2))
            scales.append(1.0)
        rows = [[kernels.plan_rows(m) for m in trio] for trio in mats]  # (the plain matrices too, as `whole_one`'s)
        if any(r is None for trio in rows for r in trio):
            return None
        return kernels.experts_one(x, [tuple(r[0] for r in trio) for trio in rows],
                                   [tuple(r[1] for r in trio) for trio in rows], scales, self.swiglu_limit)

    def fused_many(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """T tokens' routed experts and shared experts in compiled calls: each expert chosen by any token runs once
        on its tokens, in ascending id, then the shared ones on every token (the order `routed` adds them in).
        Resident stacks: one call for all. Streamed experts are read one by one through their cache, which must not
        hold a whole layer's: one call per expert, adding to one float32 sum (the same bits as one call). None
        unless every matrix is one the CPU kernels multiply from its blocks."""
        if not x.is_cpu:
            return None
        T = x.shape[0]
        # Only where the CPU has a native bf16 GEMM, and for large matrices: from `bf16_gemm_min_t` tokens (the
        # Q8_0 shared expert's, V4 Flash's shared and routed experts having one shape) the shared expert takes its
        # matrices' bf16 GEMMs (`kernels.ggml_linear`, bf16 or float32 x: `kernels.gemm_prompt`); a routed expert
        # with a whole long chunk's tokens leaves the one call for its own GEMM too, but not from R16 stacks, whose
        # tiles beat dequantize + GEMM at every chunk size without AMX. Elsewhere large experts stay in the int8 call.
        # Where the CPU has AMX (`kernels.amx_bf16`) R16 experts with R16_GEMM_MIN_T tokens or more take their bf16
        # products too (AMX tiles fed from the blocks, `kernels.amx_linear`, or a GEMM from R16_AMX_MAX_T), one
        # by one after the others' one call ("hot" below; with 16 routed experts of V4 Flash's shape a 512-token
        # chunk gives each ~190, with 256 ~12).
        values, cols = self.w1.shape[-2] * self.w1.shape[-1], self.w1.shape[-1]
        long_bf16 = x.dtype == torch.bfloat16 and T >= kernels.bf16_gemm_min_t(values, cols=cols)
        large = values >= kernels.BF16_GEMM_MIN_VALUES
        big = large and kernels.gemm_prompt(x.dtype, T, values, cols=cols)
        gemm = big or (long_bf16 and not large)
        stack = self.w1.stack_rows()
        r16 = stack is not None and stack[1] == kernels.MXFP4_R16
        hot_t = kernels.BF16_GEMM_MIN_T
        if r16:
            hot_t = kernels.bf16_gemm_min_t(values, kernels.MXFP4_R16) if x.dtype == torch.bfloat16 else 1 << 62
        hot_gemm = big and hot_t <= T
        if gemm and not big:  # small experts: routed and shared in one call over their bf16 copies
            packed = self.small_experts()
            out = None if packed is None else small_gemm.moe(packed, x, weights, ids, self.swiglu_limit)
            if out is not None:
                return out
        plan = self.current_plan()  # resident stacks: the grouping and the call in C (the same pairs as below)
        if plan is not None and not (hot_gemm and int(torch.bincount(ids.flatten()).max()) >= hot_t):
            out = kernels.moe_many(plan, x, weights, ids, shared=not gemm)
            if out is not None:
                return self.add_shared(x, out) if gemm else out
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # pairs by expert, tokens ascending within one
        experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        if hot_gemm and not r16 and int(counts.max()) >= hot_t:
            return None  # (a routed expert chosen by a whole chunk: rare; the loop takes it)
        tokens, pair_weights = order // ids.shape[1], weights.flatten()[order]
        hot = []  # (expert, its tokens, their weights): R16 experts for their own GEMMs
        if hot_gemm and r16:
            sizes = counts.tolist()
            hot = [(e, t, w) for e, c, t, w in zip(experts.tolist(), sizes, tokens.split(sizes),
                                                   pair_weights.split(sizes)) if c >= hot_t]
            cold = counts < hot_t
            keep = cold.repeat_interleave(counts)  # per pair: its expert's
            experts, counts, tokens, pair_weights = experts[cold], counts[cold], tokens[keep], pair_weights[keep]
        jobs = [(partial(self.routed_trio, e), c) for e, c in zip(experts.tolist(), counts.tolist())]
        if self.shared is not None and not gemm:
            w1, w2, w3 = self.shared
            jobs.append((lambda: (w1, w3, w2), T))
            tokens = torch.cat([tokens, torch.arange(T)])
            pair_weights = torch.cat([pair_weights, torch.ones(T)])
        streamed = not all(w.nbytes > 0 for w in (self.w1, self.w2, self.w3))
        acc = torch.zeros(T, x.shape[1]) if streamed or hot else None
        out, start = None, 0
        for group in ([j] for j in jobs) if streamed else [jobs] if jobs else []:
            rows = [[m.kernel_rows() for m in trio()] for trio, _ in group]
            if any(r is None for trio in rows for r in trio):
                return None
            n = sum(c for _, c in group)
            out = kernels.experts_many(x, [tuple(r[0] for r in trio) for trio in rows],
                                       [tuple(r[1] for r in trio) for trio in rows], [c for _, c in group],
                                       tokens[start:start + n], pair_weights[start:start + n], self.swiglu_limit,
                                       into=acc)
            if out is None:
                return None
            start += n
        for e, rows, w in hot:  # float32 sums of the bf16 GEMMs' outputs, as the call's
            acc.index_add_(0, rows, self.expert(e, x[rows]).float() * w[:, None])
        if streamed or hot:
            out = acc.to(x.dtype)
        return self.add_shared(x, out) if gemm else out

    def small_experts(self) -> small_gemm.PackedMoE | None:
        """The routed and shared experts as bf16 copies packed for `small_gemm.moe` (made once, again if a weight was
        replaced), or None: streamed experts, or matrices over small_gemm.MAX_VALUES (V4 Flash's)."""
        made_from = (self.w1, self.w2, self.w3, self.shared)
        if self.small is None or any(a is not b for a, b in zip(self.small[0], made_from)):
            mats = [self.w1, self.w3, self.w2] + list(self.shared or ())
            fits = all(w.nbytes > 0 and w.shape[-2] * w.shape[-1] <= small_gemm.MAX_VALUES for w in mats)
            packed = None
            if fits:
                w1, w3, w2 = (w.dequantize(torch.bfloat16) for w in (self.w1, self.w3, self.w2))
                shared = []
                if self.shared is not None:
                    s1, s2, s3 = (w.dequantize(torch.bfloat16) for w in self.shared)
                    shared.append((s1, s3, s2))
                packed = small_gemm.pack_moe(list(zip(w1, w3, w2)), shared)
            self.small = (made_from, packed)
        return self.small[1]

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the shared experts on x, matrix by matrix (`Weight.linear`: a long prompt's bf16 GEMM)."""
        if self.shared is None:
            return out
        w1, w2, w3 = self.shared
        return out + w2.linear(swiglu(w1.linear(x), w3.linear(x), self.swiglu_limit))

    def routed_trio(self, e: int) -> tuple[Weight, Weight, Weight]:
        """Expert e's W1, W3, W2 (read through the expert cache when streamed)."""
        return self.w1.expert(e), self.w3.expert(e), self.w2.expert(e)

    def routed_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token x [1, D]: its k experts in ascending id order (the order `routed` adds them in)."""
        out = torch.zeros_like(x)
        weights = weights[0].to(x.dtype)
        for slot, e in sorted(enumerate(ids[0].tolist()), key=lambda se: se[1]):
            out.add_(self.expert(e, x) * weights[slot])
        return out

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D]: each chosen expert runs once on the rows of the tokens that chose it."""
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        token_of = order // ids.shape[1]
        start = 0
        # one pass per expert that at least one token chose (k per token in decode)
        for e, c in zip(experts.tolist(), counts.tolist()):
            slots = order[start:start + c]
            rows = token_of[start:start + c]
            start += c
            y = self.expert(e, x[rows])
            out.index_add_(0, rows, y * weights.flatten()[slots, None].to(y.dtype))
        return out
