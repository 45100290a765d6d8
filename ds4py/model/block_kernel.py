"""One decoding token through a whole block in one compiled call.

A decoding block is ~10 compiled calls (the attention's collapse, its projections, the compressors' steps, the
indexer's query and top-k, the attention over the window and the entries, then `hc_kernel.ffn_one`'s output
projections, ffn collapse and MoE); on small models their Python around them (checks, views, new tensors, ctypes
arguments) costs more than the calls: ~0.35 ms a layer on the tiny preset, where the head takes 0.9 ms a token.
`block_one` makes the state changes those calls' wrappers make, all known before the token's values are (where the
new key goes, whether a compressor window closes and the entry row it then fills), then runs the same compiled
functions in the same order from one C function that calls them through their addresses: the same values, bit for
bit, as the calls one by one (`Block.run_one`'s other path). Where any of them would not run (weights the kernels do
not take, read-ahead, large heads on CPUs with a native bf16 GEMM, no compiler, DS4PY_NO_KERNELS=1) it returns None
before changing anything, and the caller takes the calls one by one."""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4py.cache import LayerCache
from ds4py.formats import kernels
from ds4py.model import attention_kernel, compressor_kernel, hc_kernel, indexer_kernel

_SOURCE = kernels.csrc("block.cpp")

P, I32, I64, F32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float


class Step(ctypes.Structure):
    """ds4py_compress_step's arguments after x (the C struct Step): `Compressor.step_args` with the function."""

    _fields_ = [("fn", P), ("bf", I32), ("n", I64), ("pair", P), ("a", P), ("b", P), ("kv", P), ("gate", P),
                ("p", I64), ("m", I64), ("d", I64), ("overlap", I32), ("ape", P), ("prev_kv", P), ("prev_gate", P),
                ("norm", P), ("eps", F32), ("inv_freq", P), ("half", I64), ("first", I64), ("entry", P),
                ("next_kv", P), ("next_gate", P)]


class BlockOne(ctypes.Structure):
    """Every argument of a decoding block's compiled calls (the C struct BlockOne)."""

    _fields_ = [("bf", I32), ("D", I64),
                ("hc", P), ("collapse", P), ("hc_plan", P), ("pending", P), ("streams", P), ("pending_post", P),
                ("pending_comb", P),
                ("mid", P), ("post_a", P), ("comb_a", P), ("x", P),
                ("project", P), ("project_plan", P), ("rot", P), ("half", I64), ("H", I64), ("hd", I64),
                ("q_lora", I64), ("q_residual", P), ("qkv", P), ("window_row", P), ("keys", P), ("S", I64),
                ("compress", Step), ("index_compress", Step),
                ("query", P), ("wq", P), ("wp", P), ("index_heads", I64), ("index_dim", I64), ("index_rot", P),
                ("index_half", I64), ("wscale", F32), ("index_q", P), ("index_w", P), ("top_fn", P),
                ("index_keys", P), ("index_n", I64), ("index_stride", I64), ("index_scale", F32), ("k", I64),
                ("totals", P), ("top", P),
                ("attend", P), ("entries", P), ("n", I64), ("idx", P), ("C", I64), ("sinks", P), ("scale", F32),
                ("heads", P),
                ("ffn", P), ("output", P), ("out_plan", P), ("hc_ffn", P), ("moe", P), ("moe_plan", P),
                ("hash_ids", P), ("y", P), ("next", P), ("post", P), ("comb", P), ("normed", P), ("moe_out", P),
                ("moe_w", P), ("moe_ids", P)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.ds4py_block_one.restype = ctypes.c_int
    lib.ds4py_block_one.argtypes = [ctypes.POINTER(BlockOne)]


_load = kernels.lazy_library("ds4py_block", _SOURCE, ["-O3"], declare=_declare)


def _address(lib: ctypes.CDLL | None, name: str) -> int | None:
    return None if lib is None else ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


_CALLS: list[dict | None] = []


def _calls() -> dict | None:
    """The addresses of the compiled functions a block calls, or None where a library cannot be built."""
    if not _CALLS:
        libs = kernels._lib(), hc_kernel._load(), attention_kernel._load(), indexer_kernel._load()
        step = compressor_kernel.step_function()
        _CALLS.append(None if None in libs or step is None or _load() is None else dict(
            project=_address(libs[0], "ds4py_project_one"), query=_address(libs[0], "ds4py_index_query_one"),
            output=_address(libs[0], "ds4py_output_one_plan"), moe=_address(libs[0], "ds4py_moe_one"),
            hc=_address(libs[1], "ds4py_hc_expand_collapse_plan"), ffn=_address(libs[1], "ds4py_ffn_one"),
            collapse=_address(libs[1], "ds4py_hc_collapse_plan"),
            attend_one=_address(libs[2], "ds4py_attend_one"), attend_heads=_address(libs[2], "ds4py_attend_heads"),
            top=_address(libs[3], "ds4py_index_rows"), step=ctypes.cast(step, ctypes.c_void_p).value))
    return _CALLS[0]


@dataclass(repr=False)
class Plan:
    """A block's one-token call for one dtype: the struct with its fixed arguments set and the buffers its calls
    pass between them (each token overwrites them; nothing outside the call sees them: one call at a time, as the
    engine runs the model from one thread)."""
    made_from: tuple  # the sub-plans it was made from (`parts`)
    dtype: torch.dtype
    args: BlockOne
    keep: tuple       # the buffers and plans the struct points into
    totals: torch.Tensor  # [capacity] float32: the indexer's scores of the entries, grown as entries are added
    tid2eid: torch.Tensor | None  # hash routing's table [vocab, k] as int64
    key_of: Callable  # block -> the objects its sub-plans were checked against (`key_names`)
    key: tuple        # key_of(block) when the plan was made: while each is the same object, so are the sub-plans


def key_names(block) -> list[str]:
    """The attributes of `block` whose objects its sub-plans' getters check (`parts`): the weights and norms."""
    names = ["attn." + n for n in ("wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b", "sinks", "rotary")]
    names += ["hc_attn", "hc_ffn", "attn_norm", "ffn_norm", "eps"]
    names += ["ffn." + n for n in ("read_ahead", "router.weight", "router.bias", "router.tid2eid", "w1", "w2", "w3",
                                   "shared")]
    if block.attn.compressor is not None:
        names += ["attn.compressor", "attn.compressor.wkv", "attn.compressor.wgate"]
    if block.attn.indexer is not None:
        names += ["attn.indexer", "attn.indexer.wq_b", "attn.indexer.weights_proj", "attn.indexer.compressor",
                  "attn.indexer.compressor.wkv", "attn.indexer.compressor.wgate"]
    return names


def parts(block) -> tuple | None:
    """The compiled plans of a block's calls (each checked and made once by its owner), or None where one is
    missing."""
    attn = block.attn
    parts = (attn.project_plan(), attn.output_plan(), block.hc_attn.plan_for(block.attn_norm, block.eps),
             block.hc_ffn.plan_for(block.ffn_norm, block.eps), block.ffn.one_token_plan(),
             None if attn.compressor is None else attn.compressor.step_plan(),
             None if attn.indexer is None else attn.indexer.query_plan(),
             None if attn.indexer is None else attn.indexer.compressor.step_plan())
    if None in parts[:5] or (attn.compressor is not None and parts[5] is None) or (
            attn.indexer is not None and None in parts[6:]):
        return None
    return parts


def make_plan(block, made_from: tuple, dtype: torch.dtype) -> Plan | None:
    """The struct's fixed arguments and the buffers for `block` in `dtype`, or None where the calls do not take
    its shapes."""
    calls = _calls()
    attn = block.attn
    project, out_plan, hc_attn, hc_ffn, moe_plan = made_from[:5]
    H, hd, D = attn.n_heads, attn.head_dim, hc_ffn.D
    half = attn.rotary.inv_freq.numel()
    if (calls is None or project.D != D or hc_attn.D != D or hc_attn.hc != hc_ffn.hc or project.H != H
            or project.hd != hd or out_plan.groups * out_plan.n != H * hd or out_plan.D != D or moe_plan.n != D
            or 2 * half > hd or hd % 16 or attn.sinks.dtype != torch.float32 or not attn.sinks.is_cpu
            or attn.sinks.numel() != H):
        return None
    hc, k = hc_ffn.hc, moe_plan.k
    new = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    mid, x, post_a, comb_a = new(1, hc, D), new(1, D), new(1, hc, dt=torch.float32), new(1, hc, hc, dt=torch.float32)
    q_residual, qkv, heads = new(1, project.q_lora), new(1, H + 1, hd), new(1, H, hd)
    y, normed, moe_w, moe_ids = new(1, D), new(1, D), new(1, k, dt=torch.float32), new(1, k, dt=torch.int64)
    sinks = attn.sinks.contiguous()
    a = BlockOne(bf=int(dtype == torch.bfloat16), D=D, collapse=calls["collapse"], hc_plan=ctypes.addressof(hc_attn),
                 project=calls["project"], project_plan=ctypes.addressof(project), half=half, H=H, hd=hd,
                 q_lora=project.q_lora, q_residual=q_residual.data_ptr(), qkv=qkv.data_ptr(),
                 sinks=sinks.data_ptr(), scale=hd**-0.5, heads=heads.data_ptr(),
                 ffn=calls["ffn"], output=calls["output"], out_plan=ctypes.addressof(out_plan),
                 hc_ffn=ctypes.addressof(hc_ffn), moe=calls["moe"], moe_plan=ctypes.addressof(moe_plan),
                 y=y.data_ptr(), normed=normed.data_ptr(), moe_w=moe_w.data_ptr(), moe_ids=moe_ids.data_ptr())
    keep = [made_from, mid, x, post_a, comb_a, q_residual, qkv, heads, y, normed, moe_w, moe_ids, sinks]
    ix = attn.indexer
    if ix is not None:
        (wq, _), (wp, _) = made_from[6]
        ihalf = ix.rotary.inv_freq.numel()
        if (wq.rows != ix.n_heads * ix.head_dim or wp.rows != ix.n_heads or wq.cols != project.q_lora or wp.cols != D
                or 2 * ihalf > ix.head_dim or ix.n_heads > indexer_kernel.MAX_HEADS
                or ix.compressor.dim != ix.head_dim):
            return None
        index_q, index_w, top = new(1, ix.n_heads, ix.head_dim), new(1, ix.n_heads, dt=torch.float32), \
            new(ix.topk, dt=torch.int64)
        a.wq, a.wp, a.index_heads, a.index_dim = ctypes.addressof(wq), ctypes.addressof(wp), ix.n_heads, ix.head_dim
        a.index_half, a.wscale, a.index_q, a.index_w = ihalf, ix.n_heads**-0.5, index_q.data_ptr(), index_w.data_ptr()
        a.top_fn, a.index_scale, a.top = calls["top"], ix.head_dim**-0.5, top.data_ptr()
        keep += [index_q, index_w, top]
    for compressor, step in ((attn.compressor, made_from[5]), (None if ix is None else ix.compressor, made_from[7])):
        if compressor is not None and step[0][0][0].cols != D:  # (its rows checked by `step_plan`)
            return None
    if attn.compressor is not None and attn.compressor.dim != hd:
        return None
    tid2eid = block.ffn.router.tid2eid
    if tid2eid is not None:
        tid2eid = tid2eid.to(torch.int64).contiguous()
        if tid2eid.dim() != 2 or tid2eid.shape[1] != k:
            return None
    key_of = operator.attrgetter(*key_names(block))
    return Plan(made_from, dtype, a, tuple(keep), torch.empty(64), tid2eid, key_of, key_of(block))


def _rotation(rotary, positions: torch.Tensor, half: int) -> torch.Tensor | None:
    """The token's rotation [1, half] as the C calls read it ((cos, sin) float pairs, not conjugated), or None."""
    rot = rotary.rotation(positions)
    ok = rot.dtype == torch.complex64 and not rot.is_conj() and rot.is_contiguous() and rot.numel() == half
    return rot if ok else None


def block_one(block, streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, cache: LayerCache,
              pending) -> tuple[torch.Tensor, tuple] | None:
    """`Block.run_one` of one decoding token (streams [1, hc, D], `pending` the previous block's (out, post, comb)
    or None) in one compiled call -> (next streams, the MoE's output pending with its post and comb): the calls'
    values; or None where it does not apply (nothing changed then)."""
    dtype = streams.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or not streams.is_cpu or kernels.disabled()
            or (torch.is_grad_enabled() and streams.requires_grad)):
        return None
    plan = block.one_plan
    if plan is None or plan.dtype != dtype or not all(map(operator.is_, plan.key_of(block), plan.key)):
        made_from = parts(block)
        if made_from is None:
            return None
        plan = block.one_plan = make_plan(block, made_from, dtype)
        if plan is None:
            return None
    a, hc_plan = plan.args, plan.made_from[3]
    if streams.shape != (1, hc_plan.hc, hc_plan.D) or (pending is not None and (
            pending[0].dtype != dtype or pending[0].shape != (1, hc_plan.D) or pending[1].dtype != torch.float32
            or pending[2].dtype != torch.float32)):
        return None
    attn = block.attn
    cmp, ix = attn.compressor, attn.indexer
    if attn.window <= 1:
        return None
    # the sizes after this token, to choose the attention's loop before anything changes
    S = 1 + (0 if cache.window is None else cache.window.shape[0])
    n = 0 if cmp is None else cache.compressor.n_entries + cmp.closes_next(cache.compressor)
    C = 0 if cmp is None else n if ix is None else min(ix.topk, cache.indexer.n_entries
                                                       + ix.compressor.closes_next(cache.indexer))
    large = attn.n_heads * attn.head_dim * (S + C) > attention_kernel.MAX_WORK
    if large and kernels.bf16_gemm_native():
        return None
    rot = _rotation(attn.rotary, positions, a.half)
    irot = None if ix is None else _rotation(ix.rotary, positions, a.index_half)
    if rot is None or (ix is not None and irot is None):
        return None
    hash_ids = None
    if plan.tid2eid is not None:  # hash routing: the token's row of the table
        t = int(token_ids)
        if not 0 <= t < plan.tid2eid.shape[0]:
            raise ValueError(f"block_one: token id {t} outside the hash table's {plan.tid2eid.shape[0]} rows")
        hash_ids = plan.tid2eid.data_ptr() + t * plan.tid2eid.stride(0) * 8
    # from here on the state changes
    keep = [plan]
    streams = streams if streams.is_contiguous() else streams.contiguous()
    if pending is None:
        a.hc = None
    else:
        out, post, comb = (t if t.is_contiguous() else t.contiguous() for t in pending)
        a.hc, a.pending, a.pending_post, a.pending_comb = _CALLS[0]["hc"], out.data_ptr(), post.data_ptr(), \
            comb.data_ptr()
        keep += [out, post, comb]
    mid, x, post_a, comb_a = plan.keep[1:5]
    if pending is None:
        mid = streams
    a.streams, a.mid, a.x, a.post_a, a.comb_a = streams.data_ptr(), mid.data_ptr(), x.data_ptr(), post_a.data_ptr(), \
        comb_a.data_ptr()
    a.rot = rot.data_ptr()
    keys = attn.window_slot(dtype, attn.head_dim, cache)
    S, row_bytes = keys.shape[0], keys.stride(0) * keys.element_size()
    a.keys, a.S = keys.data_ptr(), S
    a.window_row = a.keys + (S - 1) * row_bytes  # the new key's row, its last
    keep.append(keys)
    if cmp is not None:
        args, held = cmp.step_args(dtype, cache.compressor)
        a.compress = Step(_CALLS[0]["step"], *args)
        state = cache.compressor
        a.entries, a.n = (None, 0) if state.n_entries == 0 else (state.storage.data_ptr(), state.n_entries)
        keep.append(held)
    else:
        a.compress.fn, a.entries, a.n = None, None, 0
    a.idx, a.query, a.C = None, None, a.n
    if ix is not None:
        args, held = ix.compressor.step_args(dtype, cache.indexer)
        a.index_compress = Step(_CALLS[0]["step"], *args)
        keep.append(held)
        a.idx, a.C, a.k = a.top, C, C
        if C:
            state = cache.indexer  # keys [n, index_dim]: the rows of its storage
            n_keys = state.n_entries
            if plan.totals.numel() < n_keys:
                plan.totals = torch.empty(2 * n_keys)
            a.query, a.index_rot, a.index_keys, a.index_n, a.index_stride, a.totals = (
                _CALLS[0]["query"], irot.data_ptr(), state.storage.data_ptr(), n_keys, state.storage.stride(0),
                plan.totals.data_ptr())
    else:
        a.index_compress.fn = None
    a.attend = _CALLS[0]["attend_heads" if large else "attend_one"]
    a.hash_ids = hash_ids
    nxt, moe_out = torch.empty_like(streams), torch.empty(1, hc_plan.D, dtype=dtype)
    post_out, comb_out = torch.empty(1, hc_plan.hc), torch.empty(1, hc_plan.hc, hc_plan.hc)
    a.next, a.moe_out, a.post, a.comb = nxt.data_ptr(), moe_out.data_ptr(), post_out.data_ptr(), comb_out.data_ptr()
    rc = _load().ds4py_block_one(a)
    del keep
    if rc:
        raise RuntimeError(f"ds4py_block_one failed ({rc})")
    return nxt, (moe_out, post_out, comb_out)
