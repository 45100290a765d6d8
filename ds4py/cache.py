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

    def copy(self) -> CompressorState:
        """Pending and overlap tensors are replaced, never written in place, so they can be shared, except the
        decoding window (written in place: the copy gets its own); the entry storage is appended to in place, so it
        is copied."""
        out = copy.copy(self)
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

    def window_in_rows(self) -> bool:
        """Whether `window` is a view of `window_rows` (inference-mode views keep no _base: their storage says)."""
        return (self.window is not None and self.window_rows is not None
                and self.window.untyped_storage().data_ptr() == self.window_rows.untyped_storage().data_ptr())


@dataclass
class Cache:
    layers: list[LayerCache]
    tokens: list[int] = field(default_factory=list)  # the ids processed so far, for prefix reuse

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

    def clone(self) -> Cache:
        """An independent copy: later calls on either cache do not affect the other."""
        layers = [
            LayerCache(
                # a prompt's window is replaced on every call, never written in place; a decoding one is a view of
                # rows the original goes on writing
                window=layer.window.clone() if layer.window_in_rows() else layer.window,
                compressor=layer.compressor.copy() if layer.compressor else None,
                indexer=layer.indexer.copy() if layer.indexer else None,
            )
            for layer in self.layers
        ]
        return Cache(layers, list(self.tokens))

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            tensors = [layer.window_rows if layer.window_in_rows() else layer.window]
            for st in (layer.compressor, layer.indexer):
                if st is not None:
                    aliased = st.pending_rows is not None and st.buffer_kv is not None and (
                        st.buffer_kv.data_ptr() == st.pending_rows.data_ptr())  # the buffers are views of the window
                    pending = [st.pending_rows] if aliased else [st.pending_rows, st.buffer_kv, st.buffer_gate]
                    tensors += pending + [st.overlap_kv, st.overlap_gate, st.storage]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
