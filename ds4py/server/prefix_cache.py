"""Reuse of the longest cached prefix of a prompt. Agents resend a growing conversation on every turn;
the state after a previous prompt (and after its answer) is kept, and a new prompt that starts with
the same tokens continues from a copy of it instead of prefilling them again.

A V4 cache cannot be cut back to an arbitrary shorter length (the compressors have folded tokens into
their entries), so an entry is usable only when its tokens are a prefix of the new prompt; the entries
are the exact states at those lengths, so reuse gives the same logits as a fresh prefill."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ds4py.cache import Cache


@dataclass
class Entry:
    cache: Cache
    logits: torch.Tensor | None  # [vocab] the next token's logits, when known

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + (0 if self.logits is None else self.logits.numel() * 4)


class PrefixCache:
    def __init__(self, max_bytes: int = 2 * 2**30, max_entries: int = 16):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()  # LRU order, most recent last
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def lookup(self, ids: list[int]) -> tuple[Cache, torch.Tensor | None] | None:
        """A private copy of the longest entry whose tokens begin `ids` (and leave at least one token to
        feed, unless the entry knows its next logits), or None."""
        with self.lock:
            best, best_key = None, None
            for key, entry in self.entries.items():
                n = len(key)
                if n > len(ids) or (n == len(ids) and entry.logits is None) or n == 0:
                    continue
                if (best_key is None or n > len(best_key)) and tuple(ids[:n]) == key:
                    best, best_key = entry, key
            if best is None:
                self.misses += 1
                return None
            self.entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += len(best_key)
            logits = best.logits if len(best_key) == len(ids) else None
            return best.cache.clone(), logits

    def store(self, cache: Cache, logits: torch.Tensor | None = None, copy: bool = True) -> None:
        """Keep the state `cache` is in now (copied unless `copy` is False and the caller is done with it)."""
        if cache.length == 0:
            return
        key = tuple(cache.tokens)
        entry = Entry(cache.clone() if copy else cache, None if logits is None else logits.detach().float().cpu())
        if entry.nbytes > self.max_bytes:
            return
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None and entry.logits is None:
                entry.logits = old.logits
            self.entries[key] = entry
            total = sum(e.nbytes for e in self.entries.values())
            while self.entries and (len(self.entries) > self.max_entries or total > self.max_bytes):
                _, dropped = self.entries.popitem(last=False)
                total -= dropped.nbytes

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "reused_tokens": self.reused_tokens}
