"""Per-sequence decoding state. Prefill in chunks of any size and decode one token at a time give the
same logits as one full pass because every layer keeps exactly what later tokens need:
- the sliding window: the last `sliding_window - 1` rotated KV entries;
- per compressor (the attention's, and the indexer's on ratio-4 layers): the projected tokens of the
  window still being filled, the previous window's first series (ratio 4 overlaps windows), and the
  compressed entries emitted so far.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    buffer_kv: torch.Tensor | None = None    # [pending < ratio, overlap * dim] projected, not yet compressed
    buffer_gate: torch.Tensor | None = None  # [pending, overlap * dim] gate logits (+ position bias)
    overlap_kv: torch.Tensor | None = None   # [ratio, dim] series Ca of the last closed window (ratio 4)
    overlap_gate: torch.Tensor | None = None
    storage: torch.Tensor | None = None      # [capacity, dim]; rows [0, n_entries) hold the entries
    n_entries: int = 0
    # decoding: [2, ratio, overlap * dim], the pending window's kv and gate rows written in place (the buffers are
    # then views of it)
    pending_rows: torch.Tensor | None = None
    # decoding: the views (pending_rows[0, :p], pending_rows[1, :p]) for p = 0 .. ratio, made once with the rows
    pending_views: list | None = None
    # a call of two or more tokens: (overlap_kv, overlap_gate before it where its other tokens close no window, else
    # None, n_entries before it), its projections kv and gate [pending + T, overlap * dim], ratio, dim, the position
    # bias [ratio, overlap * dim] (ratio 4): `drop_last`'s
    undo: tuple | None = None

    @property
    def n_pending(self) -> int:
        """Tokens projected into the pending window, not yet compressed."""
        return 0 if self.buffer_kv is None else self.buffer_kv.shape[0]

    @property
    def entries(self) -> torch.Tensor | None:
        """[n_entries, dim] compressed, normed, rotated KV entries."""
        return None if self.storage is None else self.storage[: self.n_entries]

    def grow(self, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """n more entry rows [n, dim] to be written in place (counted as entries from now on), doubling the storage
        (a tensor like `like`) when full: amortised O(1) per entry."""
        need = self.n_entries + n
        if self.storage is None or need > self.storage.shape[0]:
            capacity = max(need, 2 * (0 if self.storage is None else self.storage.shape[0]), 64)
            grown = like.new_empty(capacity, dim)
            if self.n_entries:
                grown[: self.n_entries] = self.storage[: self.n_entries]
            self.storage = grown
        rows = self.storage[self.n_entries:need]
        self.n_entries = need
        return rows

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Append entries [n, dim] in place (`grow`) -> all entries."""
        self.grow(new.shape[0], new.shape[1], new).copy_(new)
        return self.storage[: self.n_entries]

    def drop_last(self) -> None:
        """Forget the last token of the last call (of two or more tokens: the `undo` it left): the state is the one
        the call's other tokens alone would have left. The call replaced the pending and overlap tensors (never
        wrote them in place) and appended its entries, so the kept ones are slices of what it made."""
        overlap_kv, overlap_gate, n_before, kv, gate, m, d, ape = self.undo
        keep = kv.shape[0] - 1  # the pending rows before the call, then the kept tokens'
        closed = keep // m      # windows the kept rows close
        if ape is not None and closed < (keep + 1) // m:  # the dropped token closed a window: its first series goes
            if closed:
                self.overlap_kv = kv[(closed - 1) * m: closed * m, :d]
                self.overlap_gate = gate[(closed - 1) * m: closed * m, :d] + ape[:, :d]
            else:
                self.overlap_kv, self.overlap_gate = overlap_kv, overlap_gate
        self.n_entries = n_before + closed
        self.buffer_kv, self.buffer_gate = kv[closed * m: keep], gate[closed * m: keep]
        self.undo = None

    def copy(self) -> CompressorState:
        """Pending and overlap tensors are replaced, never written in place, so they can be shared, except the
        decoding window (written in place: the copy gets its own); the entry storage is appended to in place, so it
        is copied."""
        out = copy.copy(self)
        out.undo = None  # (a copy has no last call to forget: `Cache.clone` starts its count again)
        if self.storage is not None:
            out.storage = self.storage[: self.n_entries].clone()
        if self.pending_rows is not None:  # written in place: the copy's pending rows become its own
            out.pending_rows = out.pending_views = None
            if out.buffer_kv is not None:
                out.buffer_kv, out.buffer_gate = out.buffer_kv.clone(), out.buffer_gate.clone()
        return out


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # [<= sliding_window - 1, head_dim]
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None
    # decoding: [2 * sliding_window, head_dim], the rows `window` is a view of, appended to in place
    # (`Attention.append_window`)
    window_rows: torch.Tensor | None = None
    # decoding: (the view of window_rows last made the window, its first row), and the views (window_rows[s:s + W],
    # window_rows[s + 1:s + W]) for s = 0 .. W, the keys and the next window of a full window starting at row s
    window_at: tuple | None = None
    window_views: list | None = None
    # a call of two or more tokens: (the keys it attended over [S, hd], window - 1): `drop_last`'s
    last_keys: tuple | None = None

    def drop_last(self) -> None:
        """Forget the last token of the last call of two or more tokens (`Cache.drop_last`)."""
        keys, keep = self.last_keys
        self.window = keys[:-1][-keep:] if keep else keys[:0]
        self.last_keys = None
        for state in (self.compressor, self.indexer):
            if state is not None:
                state.drop_last()

    def window_in_rows(self) -> bool:
        """Whether `window` is a view of `window_rows` (inference-mode views keep no _base: their storage says)."""
        return (self.window is not None and self.window_rows is not None
                and self.window.untyped_storage().data_ptr() == self.window_rows.untyped_storage().data_ptr())


@dataclass
class Cache:
    layers: list[LayerCache]
    tokens: list[int] = field(default_factory=list)  # the ids processed so far, for prefix reuse
    last_call: int = 0  # tokens fed by the last forward call (`drop_last` needs two or more)
    # speculative decoding's MTP block (`ds4py.speculative`): its cache, the positions it has read, and the main
    # model's streams [length - mtp_length, hc, D] at the positions after those (their next tokens not yet known to it)
    mtp: LayerCache | None = None
    mtp_length: int = 0
    mtp_lag: torch.Tensor | None = None

    @property
    def mtp_in_step(self) -> bool:
        """Whether the MTP block's state follows the main model's (every position read or in `mtp_lag`)."""
        lag = 0 if self.mtp_lag is None else self.mtp_lag.shape[0]
        return self.mtp is not None and self.mtp_length + lag == self.length

    @property
    def length(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls, compress_ratios: list[int]) -> Cache:
        layers = []
        for ratio in compress_ratios:
            layers.append(LayerCache(
                compressor=CompressorState() if ratio else None,
                indexer=CompressorState() if ratio == 4 else None,
            ))
        return cls(layers)

    def drop_last(self) -> None:
        """Forget the last token fed, as if the last forward call had not had it: speculative decoding's rejected
        guess. Only after a call of two or more tokens (those run the prompt path, which replaces the window and
        pending tensors rather than writing them in place, so what the other tokens left is still there)."""
        if self.last_call < 2:
            raise ValueError("drop_last follows a forward call of two or more tokens only")
        for layer in self.layers:
            layer.drop_last()
        self.tokens.pop()
        self.last_call = 0

    def clone(self) -> Cache:
        """An independent copy: later calls on either cache do not affect the other."""
        def copied(layer: LayerCache) -> LayerCache:
            return LayerCache(
                # a prompt's window is replaced on every call, never written in place; a decoding one is a view of
                # rows the original goes on writing
                window=layer.window.clone() if layer.window_in_rows() else layer.window,
                compressor=layer.compressor.copy() if layer.compressor else None,
                indexer=layer.indexer.copy() if layer.indexer else None,
            )

        out = Cache([copied(layer) for layer in self.layers], list(self.tokens))
        if self.mtp is not None:  # (the lag is replaced, never written in place)
            out.mtp, out.mtp_length, out.mtp_lag = copied(self.mtp), self.mtp_length, self.mtp_lag
        return out

    @property
    def nbytes(self) -> int:
        total = 0 if self.mtp_lag is None else self.mtp_lag.numel() * self.mtp_lag.element_size()
        for layer in self.layers + ([self.mtp] if self.mtp is not None else []):
            tensors = [layer.window_rows if layer.window_in_rows() else layer.window]
            for st in (layer.compressor, layer.indexer):
                if st is not None:
                    aliased = st.pending_rows is not None and st.buffer_kv is not None and (
                        st.buffer_kv.data_ptr() == st.pending_rows.data_ptr())  # the buffers are views of the window
                    pending = [st.pending_rows] if aliased else [st.pending_rows, st.buffer_kv, st.buffer_gate]
                    tensors += pending + [st.overlap_kv, st.overlap_gate, st.storage]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
