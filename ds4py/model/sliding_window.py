"""The sliding window of a prefill chunk, read in blocks of queries. Query t of a chunk sees only the
`window` keys ending at its own; scoring it against the whole chunk (the cached window plus T keys)
costs T + window - 1 products per query and a [T, H, T + window - 1] logits tensor, most of it masked.
Here every block of BLOCK consecutive queries is scored against the BLOCK + window - 1 keys its
queries see, one batched matmul over the blocks whose key slices are overlapping views of the
padded keys (no copy per block). At V4 Flash's shapes (64 heads of 512, window 128, a 256-token chunk)
blocks of 16 took 7.3 ms in bf16 where the whole-chunk products took 19, and 40 ms in float32 where
they took 86. One band of `window` keys per query is fewer products, and as fast in float32, but
torch's bf16 batched matmul copies a band's overlapping operand: 37 ms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds4py.model import products

BLOCK = 16


@dataclass
class WindowBlocks:
    keys: torch.Tensor    # [nb, L, hd]: block b's keys, L = B + window - 1 (a view of the padded keys)
    hidden: torch.Tensor  # [T, 1, L] bool: the slots query t may not see
    T: int
    B: int

    @classmethod
    def make(cls, keys: torch.Tensor, T: int, window: int, block: int = BLOCK) -> WindowBlocks:
        """keys [S, hd]: the cached window (at most window - 1 keys), then the chunk's T."""
        hd = keys.shape[1]
        B = max(1, min(block, T))
        nb = -(-T // B)
        front = window - 1 - (keys.shape[0] - T)  # slots before the oldest cached key
        if front < 0:  # more cached keys than the window reaches: the oldest are out of reach
            keys, front = keys[-front:], 0
        back = nb * B - T  # the last block's missing queries (their rows are dropped)
        if front or back:
            keys = torch.cat([keys.new_zeros(front, hd), keys, keys.new_zeros(back, hd)])
        keys = keys.contiguous()  # [nb * B + window - 1, hd]
        L = B + window - 1
        blocks = keys.as_strided((nb, L, hd), (B * hd, hd, 1))
        i = torch.arange(B, device=keys.device)[:, None]  # query within its block
        s = torch.arange(L, device=keys.device)  # key slot within the block's keys
        start = torch.arange(nb, device=keys.device)[:, None, None] * B  # padded index of the block's slot 0
        # query b * B + i sees padded keys [b * B + i, b * B + i + window - 1]
        hidden = (s < i) | (s > i + window - 1) | (start + s < front)  # [nb, B, L]
        return cls(blocks, hidden.reshape(nb * B, 1, L)[:T], T, B)

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, hd] -> q . k for every slot [T, H, L] (the hidden slots too: mask them)."""
        nb, L, hd = self.keys.shape
        H = q.shape[1]
        return products.bmm(self._pad(q).reshape(nb, self.B * H, hd), self.keys.transpose(1, 2)).view(-1, H, L)[:self.T]

    def values(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [T, H, L] (zero on the hidden slots) -> sum over slots of probs * key [T, H, hd]."""
        nb, L, hd = self.keys.shape
        H = probs.shape[1]
        return products.bmm(self._pad(probs).reshape(nb, self.B * H, L), self.keys).view(-1, H, hd)[:self.T]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        missing = self.keys.shape[0] * self.B - self.T
        return torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing else x
