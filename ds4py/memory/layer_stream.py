"""The transformer's blocks under the stream-layers memory mode: the layers the plan keeps are built
once; every other layer is built from the file (`WeightSource.read`: memory of its own, not a view of
a map) each time it runs and dropped when it returns, so at most one streamed layer is in memory.

No LRU: the layers run in the same cycle every forward step, so an LRU smaller than the model would
miss every time; keeping a fixed set hits every time. Counted like the expert cache (`CacheStats`):
hits are runs of kept layers, misses builds of streamed ones, bytes_read what those builds read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from ds4py.formats import Weight
from ds4py.memory.expert_cache import CacheStats
from ds4py.model.block import Block

Read = Callable[[str], Weight]


class StreamedBlocks:
    """A sequence of `count` blocks; `build(layer, read)` makes one from weights fetched by `read`."""

    def __init__(self, count: int, build: Callable[[int, Read], Block], read: Read, keep: Collection[int]):
        self.count = count
        self.build = build
        self.read = read
        self.kept = {layer: build(layer, read) for layer in sorted(keep)}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, layer: int) -> Block:
        """The block of `layer`; a streamed one lives as long as the caller holds it (index per use,
        `blocks[i](...)`, so that the previous layer is gone before the next is built)."""
        if not 0 <= layer < self.count:
            raise IndexError(layer)
        block = self.kept.get(layer)
        if block is not None:
            self.stats.hits += 1
            return block
        self.stats.misses += 1
        return self.build(layer, self.counted)

    def __iter__(self) -> Iterator[Block]:
        for layer in range(self.count):
            yield self[layer]

    def counted(self, name: str) -> Weight:
        w = self.read(name)
        self.stats.bytes_read += w.nbytes
        return w
