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
    entries: torch.Tensor | None = None      # [n_entries, dim] compressed, normed, rotated

    @property
    def n_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[0]


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # [<= sliding_window - 1, head_dim]
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


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
        """An independent copy (tensors are replaced, never modified in place, so sharing them is safe)."""
        return Cache([copy.copy(layer) for layer in self._layers_deep()], list(self.tokens))

    def _layers_deep(self) -> list[LayerCache]:
        return [
            LayerCache(
                window=layer.window,
                compressor=copy.copy(layer.compressor),
                indexer=copy.copy(layer.indexer),
            )
            for layer in self.layers
        ]

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            tensors = [layer.window]
            for st in (layer.compressor, layer.indexer):
                if st is not None:
                    tensors += [st.buffer_kv, st.buffer_gate, st.overlap_kv, st.overlap_gate, st.entries]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
