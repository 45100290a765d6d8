"""The hyper-connections in compiled calls. mHC's mixing weights apply
sigmoids, a softmax and ~20 Sinkhorn-Knopp iterations to tiny [hc, hc] matrices: ~90 torch ops of a few
values each, twice per layer, whose dispatch cost (~0.35 ms per call) rivals the matmuls in decoding.
`hc_weights` runs them as one C++ loop in float32 (same operations, same order; `expf` may differ from
torch's vectorised exp in the last bit). `hc_collapse` also does the norm, the [(2 + hc) * hc, hc * D]
projection and the weighted sum of the streams around it, for any number of tokens; `hc_expand` does
the post/comb mixing after the sub-block for any number of tokens, in float32 with one rounding to the
streams' dtype at the end (torch rounds bf16 streams after each op): in decoding the torch ops of
these two took ~3 ms of a 64 ms flash-slice token (three layers), mostly small ops waking the thread
pool.
Compiled at first use like `ds4py.formats.kernels`; without a compiler, or with DS4PY_NO_KERNELS=1,
callers use the torch code."""

from __future__ import annotations

import ctypes

import torch

from ds4py.formats import kernels

_SOURCE = kernels.csrc("hyper_connection.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ds4py_hc_weights.restype = None
    lib.ds4py_hc_weights.argtypes = [p, i64, i32, p, p, i32, f32, p, p, p]
    lib.ds4py_hc_collapse.restype = ctypes.c_int
    lib.ds4py_hc_collapse.argtypes = [p, i32, i64, i32, i64, p, p, p, i32, f32, f32, p, p, p, p, p, i32, f32, p]
    lib.ds4py_hc_head.restype = ctypes.c_int
    lib.ds4py_hc_head.argtypes = [p, i32, i64, i32, i64, p, p, p, f32, f32, p, p, p, i32, f32, p]
    lib.ds4py_hc_expand_collapse_plan.restype = ctypes.c_int
    lib.ds4py_hc_expand_collapse_plan.argtypes = [ctypes.POINTER(HcPlan), p, p, i32, i64, p, p, p, p, p, p]
    lib.ds4py_ffn_one.restype = ctypes.c_int
    lib.ds4py_ffn_one.argtypes = [p, p, ctypes.POINTER(HcPlan), p, p, p, i32, p, p, p, p, p, p, p, p, p, p, p, p]
    lib.ds4py_hc_expand.restype = None
    lib.ds4py_hc_expand.argtypes = [p, p, i32, i64, i32, i64, p, p, p]


_load = kernels.lazy_library("ds4py_hc", _SOURCE, ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"], _declare)


def hc_weights(mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """mix [T, (2 + hc) * hc] float32 (CPU) -> pre [T, hc], post [T, hc], comb [T, hc, hc]; None when the
    compiled code is not available (or the tensors are not on the CPU)."""
    if mix.device.type != "cpu" or base.device.type != "cpu":
        return None
    lib = _load()
    if lib is None:
        return None
    mix = mix.float().contiguous()
    base, scale = base.float().contiguous(), scale.float().contiguous()
    T = mix.shape[0]
    pre, post, comb = mix.new_empty(T, hc), mix.new_empty(T, hc), mix.new_empty(T, hc, hc)
    lib.ds4py_hc_weights(mix.data_ptr(), T, hc, base.data_ptr(), scale.data_ptr(), iters, eps, pre.data_ptr(),
                         post.data_ptr(), comb.data_ptr())
    return pre, post, comb


# Whether the collapses (a block's, the final one) run compiled; False: torch's ops (tests compare the two). At
# any number of tokens: a prompt's projection goes through fn by chunks that stay in L2 (`project_chunked`), so
# V4 Flash's 256-token collapse takes 1.7 ms where torch's matmul, weighted sum and conversions took 5.2 (2 Zen 5
# cores); before, prompts over 16 tokens with wide streams went to torch, whose values differ by float32 summation
# order from a token decoded alone. The compiled mixing weights and expand run for any T, split over threads by token.
COMPILED_COLLAPSE = True


def _fusable(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    return (t.dim() >= 2 and t.dtype in (torch.float32, torch.bfloat16) and all(x.is_cpu for x in tensors)
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)))


def _collapsible(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the compiled collapse (a block's or the final one) takes these: float32 contiguous parameters."""
    return (COMPILED_COLLAPSE and _fusable(streams, fn)
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (fn, base, scale)))


def hc_collapse(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
                hc_eps: float, norm_eps: float, norm: tuple[torch.Tensor, float] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """streams [T, hc, D] -> (x [T, D] in streams' dtype, post [T, hc], comb [T, hc, hc]) in one compiled call,
    or None where it does not apply (other devices or dtypes, autograd, no compiler). norm = (weight [D], eps):
    x comes back RMS-normed as `row_kernels.rms_norm` norms it."""
    if not _collapsible(streams, fn, base, scale):
        return None
    T, hc, D = streams.shape
    w = None
    if norm is not None:
        w = norm[0]
        if not w.is_cpu or w.dtype not in (torch.float32, torch.bfloat16) or w.numel() != D:
            return None
        w = w.contiguous()
    lib = _load()
    if lib is None:
        return None
    if not streams.is_contiguous():
        streams = streams.contiguous()
    out = streams.new_empty(T, D)  # x, or the normed x (x itself then stays in the C code's scratch)
    post, comb = torch.empty(T, hc), torch.empty(T, hc, hc)
    rc = lib.ds4py_hc_collapse(streams.data_ptr(), int(streams.dtype == torch.bfloat16), T, hc, D, fn.data_ptr(),
                               base.data_ptr(), scale.data_ptr(), iters, hc_eps, norm_eps,
                               out.data_ptr() if w is None else None, None, post.data_ptr(), comb.data_ptr(),
                               None if w is None else w.data_ptr(), int(w is not None and w.dtype == torch.bfloat16),
                               0.0 if norm is None else norm[1], out.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_hc_collapse failed ({rc})")
    return out, post, comb


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float, norm: torch.Tensor, out_eps: float) -> torch.Tensor | None:
    """The final collapse (`HyperHead`) of streams [T, hc, D], then the output RMS norm (weight `norm`, out_eps) ->
    [T, D] in streams' dtype, in one compiled call; None where it does not apply (as `hc_collapse`)."""
    if (not _collapsible(streams, fn, base, scale) or not norm.is_cpu
            or norm.dtype not in (torch.float32, torch.bfloat16)):
        return None
    T, hc, D = streams.shape
    if fn.shape != (hc, hc * D) or base.numel() != hc or norm.numel() != D:
        return None
    lib = _load()
    if lib is None:
        return None
    streams, norm = streams.contiguous(), norm.contiguous()
    normed = streams.new_empty(T, D)
    rc = lib.ds4py_hc_head(streams.data_ptr(), int(streams.dtype == torch.bfloat16), T, hc, D, fn.data_ptr(),
                           base.data_ptr(), scale.data_ptr(), hc_eps, norm_eps, None, None, norm.data_ptr(),
                           int(norm.dtype == torch.bfloat16), out_eps, normed.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_hc_head failed ({rc})")
    return normed


def hc_expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
              comb: torch.Tensor) -> torch.Tensor | None:
    """out [T, D], streams [T, hc, D] -> post_k * out + sum_j comb[j, k] * streams_j [T, hc, D], or None."""
    if not _fusable(streams, out) or out.dtype != streams.dtype:
        return None
    lib = _load()
    if lib is None:
        return None
    T, hc, D = streams.shape
    if not streams.is_contiguous():
        streams = streams.contiguous()
    if not out.is_contiguous():
        out = out.contiguous()
    if post.dtype != torch.float32 or not post.is_contiguous():  # (from the compiled collapse they are both)
        post = post.float().contiguous()
    if comb.dtype != torch.float32 or not comb.is_contiguous():
        comb = comb.float().contiguous()
    nxt = torch.empty_like(streams)
    lib.ds4py_hc_expand(out.data_ptr(), streams.data_ptr(), int(streams.dtype == torch.bfloat16), T, hc, D,
                        post.data_ptr(), comb.data_ptr(), nxt.data_ptr())
    return nxt


class HcPlan(ctypes.Structure):
    """A connection's collapse parameters and its sub-block's norm as `ds4py_hc_expand_collapse_plan` reads them
    (the C struct HcPlan); `keep` holds the tensors it points into."""

    _fields_ = [("hc", ctypes.c_int64), ("D", ctypes.c_int64), ("fn", ctypes.c_void_p), ("base", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("iters", ctypes.c_int32), ("hc_eps", ctypes.c_float),
                ("norm_eps", ctypes.c_float), ("w", ctypes.c_void_p), ("wbf", ctypes.c_int32),
                ("out_eps", ctypes.c_float)]


def hc_plan(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int, hc_eps: float,
            norm_eps: float, norm: tuple[torch.Tensor, float]) -> HcPlan | None:
    """The plan of `hc_expand_collapse` for these parameters (fn [(2 + hc) * hc, hc * D]), or None where the
    compiled code does not take them."""
    weight = norm[0]
    D = fn.shape[1] // hc if fn.dim() == 2 and hc else 0
    if (not all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in (fn, base, scale))
            or fn.shape != ((2 + hc) * hc, hc * D) or base.numel() != (2 + hc) * hc or scale.numel() != 3
            or not weight.is_cpu or weight.dtype not in (torch.float32, torch.bfloat16) or weight.numel() != D
            or _load() is None):
        return None
    weight = weight.contiguous()
    plan = HcPlan(hc, D, fn.data_ptr(), base.data_ptr(), scale.data_ptr(), iters, hc_eps, norm_eps,
                  weight.data_ptr(), int(weight.dtype == torch.bfloat16), norm[1])
    plan.keep = (fn, base, scale, weight)
    return plan


def hc_expand_collapse(plan: HcPlan, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
                       comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`hc_expand` of a sub-block's out [T, D] into streams [T, hc, D], then `hc_collapse` of the result for the
    next sub-block (its parameters and norm from `hc_plan`, checked there once) in one compiled call -> (next
    streams, normed x [T, D], post, comb), the same values as the two calls; None where it does not apply (as
    `hc_collapse`)."""
    dtype, T = streams.dtype, streams.shape[0]
    if (not COMPILED_COLLAPSE or dtype not in (torch.float32, torch.bfloat16) or out.dtype != dtype
            or streams.shape != (T, plan.hc, plan.D) or out.shape != (T, plan.D)
            or not (streams.is_cpu and out.is_cpu) or post.dtype != torch.float32 or comb.dtype != torch.float32
            or not post.is_contiguous() or not comb.is_contiguous()
            or (torch.is_grad_enabled() and (streams.requires_grad or out.requires_grad))):
        return None
    lib = _load()
    if lib is None:
        return None
    if not streams.is_contiguous():
        streams = streams.contiguous()
    if not out.is_contiguous():
        out = out.contiguous()
    hc = plan.hc
    nxt, normed = torch.empty_like(streams), torch.empty(T, plan.D, dtype=dtype)
    post_out, comb_out = torch.empty(T, hc), torch.empty(T, hc, hc)
    rc = lib.ds4py_hc_expand_collapse_plan(plan, out.data_ptr(), streams.data_ptr(), int(dtype == torch.bfloat16), T,
                                           post.data_ptr(), comb.data_ptr(), nxt.data_ptr(), post_out.data_ptr(),
                                           comb_out.data_ptr(), normed.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_hc_expand_collapse failed ({rc})")
    return nxt, normed, post_out, comb_out


_KERNEL_CALLS: list[tuple[int, int] | None] = []


def _kernel_calls() -> tuple[int, int] | None:
    """The addresses of the kernels' ds4py_output_one_plan and ds4py_moe_one (`ffn_one` calls them), or None."""
    if not _KERNEL_CALLS:
        lib = kernels._lib()
        _KERNEL_CALLS.append(None if lib is None else (
            ctypes.cast(lib.ds4py_output_one_plan, ctypes.c_void_p).value,
            ctypes.cast(lib.ds4py_moe_one, ctypes.c_void_p).value))
    return _KERNEL_CALLS[0]


def ffn_one(out_plan, hc: HcPlan, moe_plan, heads: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor, hash_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    """A decoding token's attention output heads [1, H, hd] through the output projections (`kernels.output_one` of
    out_plan), the expand into streams [1, hc, D] with post and comb and the ffn's collapse (`hc_expand_collapse`
    of hc), then the MoE (`kernels.moe_one` of moe_plan, hash_ids [1, k] on hash-routed layers) in one compiled call
    -> (next streams, the MoE's output [1, D], post [1, hc], comb [1, hc, hc]): the three calls' values. None
    where it does not apply (nothing was called then)."""
    dtype = streams.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or heads.dtype != dtype or streams.shape != (1, hc.hc, hc.D)
            or heads.numel() != out_plan.groups * out_plan.n or out_plan.D != hc.D or moe_plan.n != hc.D
            or not (heads.is_cpu and streams.is_cpu) or post.dtype != torch.float32 or comb.dtype != torch.float32
            or not post.is_contiguous() or not comb.is_contiguous() or kernels.disabled()
            or (torch.is_grad_enabled() and (streams.requires_grad or heads.requires_grad))):
        return None
    calls, lib = _kernel_calls(), _load()
    if calls is None or lib is None:
        return None
    if hash_ids is not None:
        hash_ids = hash_ids.to(torch.int64).contiguous()
        if hash_ids.numel() != moe_plan.k:
            raise ValueError(f"ffn_one: {hash_ids.numel()} hash ids for {moe_plan.k} experts per token")
    heads, streams = heads.contiguous(), streams.contiguous()
    D, k = hc.D, moe_plan.k
    y, normed, moe_out = torch.empty(1, D, dtype=dtype), torch.empty(1, D, dtype=dtype), torch.empty(1, D, dtype=dtype)
    nxt, post_out, comb_out = torch.empty_like(streams), torch.empty(1, hc.hc), torch.empty(1, hc.hc, hc.hc)
    w, ids = torch.empty(1, k), torch.empty(1, k, dtype=torch.int64)
    rc = lib.ds4py_ffn_one(calls[0], ctypes.addressof(out_plan), hc, calls[1], ctypes.addressof(moe_plan),
                           heads.data_ptr(), int(dtype == torch.bfloat16), streams.data_ptr(), post.data_ptr(),
                           comb.data_ptr(), None if hash_ids is None else hash_ids.data_ptr(), y.data_ptr(),
                           nxt.data_ptr(), post_out.data_ptr(), comb_out.data_ptr(), normed.data_ptr(),
                           moe_out.data_ptr(), w.data_ptr(), ids.data_ptr())
    if rc:
        raise RuntimeError(f"ds4py_ffn_one failed ({rc})")
    return nxt, moe_out, post_out, comb_out
