"""The KV compressor: every `ratio` tokens become one compressed KV entry, a softmax-gated sum of the
tokens' projections (plus a learned position bias `ape`), RMS-normed, rotated at the window's first
position.

Ratio 4 (CSA) overlaps windows: each token projects to two series, Ca and Cb; entry w pools window
w's Cb with window w-1's Ca over 2 * ratio slots. Ratio 128 (HCA) pools its own window only.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from ds4py.cache import CompressorState
from ds4py.formats import Weight, kernels
from ds4py.model import compressor_kernel
from ds4py.model.compressor_kernel import close_windows
from ds4py.model.norms import rms_norm
from ds4py.model.rope import Rotary, apply_rope


@dataclass
class Compressor:
    wkv: Weight          # [overlap * dim, D]
    wgate: Weight        # [overlap * dim, D]
    ape: torch.Tensor    # [ratio, overlap * dim] float32
    norm: torch.Tensor   # [dim]
    ratio: int
    dim: int
    eps: float
    rotary: Rotary
    ape_cache: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    # (wkv, wgate, (their kernels.matrix pair, norm, inv_freq, the step and pair functions) or None): `step_one`'s,
    # made again if a weight changes
    plan: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def overlap(self) -> bool:
        return self.ratio == 4

    def ape_as(self, dtype: torch.dtype) -> torch.Tensor:
        """`ape` in `dtype`, converted once (a closing window needs it every `ratio` tokens)."""
        cached = self.ape_cache
        if cached is None or cached[0] is not self.ape or cached[1].dtype != dtype:
            cached = self.ape_cache = (self.ape, self.ape.to(dtype))
        return cached[1]

    def project(self, x: torch.Tensor, state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> kv, gate [pending + T, overlap * dim]: the pending window's projections, then x's."""
        kv, gate = self.wkv.linear(x), self.wgate.linear(x)
        if state.buffer_kv is not None:
            kv, gate = torch.cat([state.buffer_kv, kv]), torch.cat([state.buffer_gate, gate])
        return kv, gate

    def step_one(self, x: torch.Tensor, state: CompressorState) -> torch.Tensor | None:
        """A decoding token x [1, D] in one compiled call (`compressor_kernel`'s ds4py_compress_step): its two
        projections (`kernels.linear_pair`'s values) written into its row of the pending window
        `state.pending_rows` [2, ratio, overlap * dim] (made on first use; a prompt's pending rows copied in once)
        and, when the row closes the window, its entry (as `close_compiled` makes it) appended -> all entries; or
        None where the weights or dtypes are not ones the call takes (nothing changed then)."""
        plan = self.step_plan()
        if (plan is None or kernels.disabled() or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu
                or x.numel() != x.shape[-1] or x.shape[-1] != plan[0][0][0].cols
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        args, keep = self.step_args(x.dtype, state)
        x = x if x.is_contiguous() else x.contiguous()
        rc = plan[3](x.data_ptr(), *args)
        del keep
        if rc:
            raise RuntimeError(f"ds4py_compress_step failed ({rc})")
        entries = state.entries
        return entries if entries is not None else x.new_zeros(0, self.dim)

    def step_plan(self) -> tuple | None:
        """`step_one`'s plan, checked once per pair of weights: ((the kernels.matrix of wkv, of wgate), norm, inv_freq,
        the compiled step, the address of the kernels' linear pair), or None where the call does not take them."""
        plan = self.plan
        if plan is None or plan[0] is not self.wkv or plan[1] is not self.wgate:
            mats = kernels.matrix(self.wkv), kernels.matrix(self.wgate)
            ok = (None not in mats and self.norm.dtype == torch.float32 and self.norm.is_cpu
                  and self.rotary.inv_freq.dtype == torch.float32 and 2 * self.rotary.inv_freq.numel() <= self.dim
                  and mats[0][0].rows == mats[1][0].rows == (2 if self.overlap else 1) * self.dim
                  and mats[0][0].cols == mats[1][0].cols)
            step = compressor_kernel.step_function() if ok else None
            pair = kernels.linear_pair_address() if step is not None else None
            plan = self.plan = (self.wkv, self.wgate, (mats, self.norm.contiguous(), self.rotary.inv_freq.contiguous(),
                                                       step, pair) if pair is not None else None)
        return plan[2]

    def closes_next(self, state: CompressorState) -> bool:
        """Whether the next token closes the pending window (emits an entry)."""
        return state.n_pending == self.ratio - 1

    def step_args(self, dtype: torch.dtype, state: CompressorState) -> tuple[tuple, tuple]:
        """The state changes of one decoding token (in `dtype`) through `step_one`'s call, made before it (its
        pending rows and entry are views of tensors it writes into) -> (that call's arguments after x's address,
        the tensors they point into that `state` no longer holds: keep them until the call returns). Needs
        `step_plan`."""
        ((a, _), (b, _)), norm, inv_freq, _, pair = self.plan[2]
        m, d = self.ratio, self.dim
        p = state.n_pending
        block = state.pending_rows
        if block is None or block.dtype != dtype:
            block = state.pending_rows = torch.empty(2, m, a.rows, dtype=dtype, device=norm.device)
            state.pending_views = [(block[0, :q], block[1, :q]) for q in range(m + 1)]
        if p and state.buffer_kv.data_ptr() != block.data_ptr():
            block[0, :p], block[1, :p] = state.buffer_kv, state.buffer_gate
        ape = self.ape_as(dtype)
        entry = next_kv = next_gate = prev_kv = prev_gate = None
        first = state.n_entries * m  # the window's first position
        if p == m - 1:  # this token closes the window
            entry = state.grow(1, d, block)
            if self.overlap:
                next_kv, next_gate = block.new_empty(m, d), block.new_empty(m, d)
                if state.overlap_kv is not None:
                    prev_kv, prev_gate = state.overlap_kv.contiguous(), state.overlap_gate.contiguous()
        args = (int(dtype == torch.bfloat16), a.cols, pair, ctypes.addressof(a), ctypes.addressof(b),
                block.data_ptr(), block.data_ptr() + block.stride(0) * block.element_size(), p, m, d,
                int(self.overlap), ape.data_ptr(),
                None if prev_kv is None else prev_kv.data_ptr(), None if prev_gate is None else prev_gate.data_ptr(),
                norm.data_ptr(), self.eps, inv_freq.data_ptr(), inv_freq.numel(), first,
                None if entry is None else entry.data_ptr(),
                None if next_kv is None else next_kv.data_ptr(), None if next_gate is None else next_gate.data_ptr())
        if entry is None:
            state.buffer_kv, state.buffer_gate = state.pending_views[p + 1]
        else:
            state.buffer_kv, state.buffer_gate = state.pending_views[0]
            if self.overlap:
                state.overlap_kv, state.overlap_gate = next_kv, next_gate
        return args, (prev_kv, prev_gate)

    def close_compiled(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState,
                       first_position: int) -> torch.Tensor | None:
        """The closing windows' entries in one compiled call (`compressor_kernel.close_windows`: torch's values up
        to float32 summation order), appended to `state`; the last window's first series kept for the next ->
        all entries, or None where the call does not apply (nothing changed then)."""
        m, d = self.ratio, self.dim
        ape = self.ape_as(kv.dtype)
        out = kv.new_empty(kv.shape[0] // m, d)
        prev = (state.overlap_kv, state.overlap_gate) if self.overlap else (None, None)
        if not close_windows(kv, gate, m, d, self.overlap, ape, *prev, self.norm, self.eps, self.rotary.inv_freq,
                             first_position, out):
            return None
        if self.overlap:
            state.overlap_kv, state.overlap_gate = kv[-m:, :d], gate[-m:, :d] + ape[:, :d]
        return state.append(out)

    def __call__(self, x: torch.Tensor, state: CompressorState) -> torch.Tensor:
        """Feed x [T, D] (the attention input); emit the entries of the windows it closes, append them
        to `state.entries` and return all entries [n_entries, dim]."""
        if x.shape[0] == 1:
            done = self.step_one(x, state)
            if done is not None:
                return done
        kv, gate = self.project(x, state)  # [pending + T, overlap * dim]
        # `CompressorState.drop_last`'s; the overlap from before only where the call's other tokens close no window
        # (else it would keep the previous chunk's projections alive, which its overlap is a view of)
        before = (state.overlap_kv, state.overlap_gate) if (kv.shape[0] - 1) // self.ratio == 0 else (None, None)
        state.undo = (*before, state.n_entries, kv, gate, self.ratio, self.dim,
                      self.ape_as(gate.dtype) if self.overlap else None)
        first_position = state.n_entries * self.ratio
        usable = kv.shape[0] // self.ratio * self.ratio
        if usable == 0:  # (decoding, most tokens: nothing closes; no views to make)
            state.buffer_kv, state.buffer_gate = kv, gate
            entries = state.entries
            return entries if entries is not None else kv.new_zeros(0, self.dim)
        state.buffer_kv, state.buffer_gate = kv[usable:], gate[usable:]

        m, d = self.ratio, self.dim
        n = usable // m
        done = self.close_compiled(kv[:usable], gate[:usable], state, first_position)
        if done is not None:
            return done
        kv = kv[:usable].view(n, m, -1)
        gate = gate[:usable].view(n, m, -1) + self.ape_as(gate.dtype)
        if self.overlap and n == 1 and state.overlap_kv is not None:  # decoding: one window, after another
            prev_kv, prev_gate = state.overlap_kv, state.overlap_gate
            state.overlap_kv, state.overlap_gate = kv[0, :, :d], gate[0, :, :d]
            kv = torch.cat([prev_kv[None], kv[..., d:]], dim=1)
            gate = torch.cat([prev_gate[None], gate[..., d:]], dim=1)
        elif self.overlap:
            # slots [0, m): previous window's Ca; slots [m, 2m): this window's Cb
            prev_kv = kv.new_zeros(n, m, d)
            prev_gate = gate.new_full((n, m, d), float("-inf"))
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :d], gate[:-1, :, :d]
            if state.overlap_kv is not None:
                prev_kv[0], prev_gate[0] = state.overlap_kv, state.overlap_gate
            state.overlap_kv, state.overlap_gate = kv[-1, :, :d], gate[-1, :, :d]
            kv = torch.cat([prev_kv, kv[..., d:]], dim=1)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=1)
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        pooled = rms_norm((kv * weights).sum(dim=1), self.norm, self.eps)  # [n, d]
        positions = torch.arange(n, device=x.device) * m + first_position
        entries = apply_rope(pooled, *self.rotary.cos_sin(positions))  # not `rotation`: these are new positions
        return state.append(entries)
