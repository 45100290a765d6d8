"""The multi-token-prediction (MTP) block: from the main model's residual streams at position i (after its last
layer, before the hyper-connection head) and the embedding of token i + 1, the hidden state that predicts token
i + 2 through the shared output head. As DeepSeek's V4 `MTPBlock.forward` (inference/model.py):

    x = e_proj(enorm(embed(next_ids)))[:, None] + h_proj(hnorm(streams))   # [T, hc, D]
    x = block(x)                                                           # a full V4 block (layer n_layers)
    hidden = norm(hc_head(x))                                              # its own hc head and norm

Its block keeps a cache of its own (`LayerCache`, the block's compress ratio `compress_ratios[n_layers]`), one
entry per main position whose next token is known, at the main model's positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds4py.cache import LayerCache
from ds4py.formats import Weight
from ds4py.model.block import Block, complete
from ds4py.model.hyper_connection import HyperHead
from ds4py.model.norms import rms_norm


@dataclass
class MTPBlock:
    block: Block
    e_proj: Weight        # [D, D]
    h_proj: Weight        # [D, D]
    enorm: torch.Tensor   # [D]
    hnorm: torch.Tensor   # [D]
    norm: torch.Tensor    # [D]
    hc_head: HyperHead
    eps: float

    def __call__(self, streams: torch.Tensor, next_embeds: torch.Tensor, next_ids: torch.Tensor,
                 positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """streams [T, hc, D] of the main model at `positions` [T], the embeddings [T, D] of the tokens after them
        (ids `next_ids` [T], for hash routing) -> the normed hidden states [T, D] for the shared head; updates
        `cache`."""
        T, hc, D = streams.shape
        e = self.e_proj.linear(rms_norm(next_embeds.to(streams.dtype), self.enorm, self.eps))  # [T, D]
        h = self.h_proj.linear(rms_norm(streams, self.hnorm, self.eps).reshape(T * hc, D)).view(T, hc, D)
        x = (h + e.unsqueeze(1)).contiguous()
        x, pending = self.block(x, positions, next_ids, cache)
        return self.hc_head.normed(complete(x, pending), self.norm, self.eps)
