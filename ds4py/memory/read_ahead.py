"""Read-ahead for the streaming memory modes: while layer L computes, a background thread reads into
the expert cache the routed experts layer L+1 will likely need, so that its cache misses cost less.

Predictions, made when layer L has routed (and, for layer 0, when the forward step starts):
- hash layers (`tid2eid`): exact, from the token ids;
- "gate": layer L+1's router applied to layer L's MoE input (the hidden state available at L), when
  layer L+1's router is held (every layer in stream-experts, the kept ones in stream-layers);
- "previous": the experts layer L+1 chose in the previous forward step (the previous token in decode);
- "hash": hash layers only.
The job reading for a layer is stopped when that layer routes (what it did not read yet is read on
demand), and the layer's experts are then pinned: the next job never evicts them (`ExpertCache.prefetch`).
Only which experts are in the cache changes, never their values: the logits are the same with it off.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ds4py.memory.expert_cache import ExpertCache, StreamedExperts
from ds4py.model.moe import Router

PREDICTORS = ("gate", "previous", "hash")
DEFAULT_PREDICTOR = "gate"
Stacks = tuple[StreamedExperts, StreamedExperts, StreamedExperts]  # w1, w3, w2: the order they run in


class ReadAhead:
    def __init__(self, cache: ExpertCache, stacks: list[Stacks], predictor: str = "gate"):
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown read-ahead predictor {predictor!r}: use one of {', '.join(PREDICTORS)}")
        self.cache = cache
        self.stacks = stacks
        self.predictor = predictor
        self.routers: dict[int, Router] = {}            # layers whose router is held
        self.previous: dict[int, torch.Tensor] = {}     # layer -> expert ids it chose in the last step
        self.predicted: dict[int, torch.Tensor] = {}    # layer -> ids the running job predicted for it
        self.needed = [0] * len(stacks)   # per layer: experts it used (unique per step) ...
        self.covered = [0] * len(stacks)  # ... of which predicted: the prediction's coverage, cache aside
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ds4py-read-ahead")
        self.job: tuple[Future, threading.Event] | None = None

    def start(self, token_ids: torch.Tensor) -> None:
        """A forward step over token_ids [T] (or one token of each sequence in a batch) begins."""
        self.finish()  # left running by a step that raised
        with self.cache.lock:
            self.cache.pinned = set()
        self.submit(0, self.predict(0, None, token_ids))

    def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Layer `layer` routed x [T, D] to ids [T, k]: stop the job reading for it, pin its experts,
        start the job for the next layer."""
        self.finish()
        needed = ids.unique()
        guess = self.predicted.pop(layer, None)
        self.needed[layer] += needed.numel()
        if guess is not None:
            self.covered[layer] += int(torch.isin(needed, guess).sum())
        self.previous[layer] = needed
        with self.cache.lock:
            self.cache.pinned = {(s.name, e) for s in self.stacks[layer] for e in needed.tolist()}
        if layer + 1 < len(self.stacks):
            self.submit(layer + 1, self.predict(layer + 1, x, token_ids))

    def predict(self, layer: int, x: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Expert ids layer `layer` will likely use, or None."""
        router = self.routers.get(layer)
        if router is not None and router.tid2eid is not None:
            return router.tid2eid[token_ids].unique()
        if self.predictor == "gate" and router is not None and x is not None:
            return router(x, token_ids)[1].unique()
        if self.predictor == "previous":
            return self.previous.get(layer)
        return None

    def submit(self, layer: int, ids: torch.Tensor | None) -> None:
        if ids is None or ids.numel() == 0:
            return
        self.predicted[layer] = ids
        items = [(s, e) for e in ids.tolist() for s in self.stacks[layer]]
        keep = {(s.name, e) for s, e in items}
        cancel = threading.Event()
        self.job = (self.pool.submit(fetch, items, keep, cancel), cancel)

    def finish(self) -> None:
        """Stop the running job after the expert it is reading (its errors are raised here)."""
        if self.job is not None:
            future, cancel = self.job
            self.job = None
            cancel.set()
            future.result()

    def coverage(self, layers: range | list[int]) -> float:
        """The fraction of the experts `layers` used that had been predicted."""
        needed = sum(self.needed[i] for i in layers)
        return sum(self.covered[i] for i in layers) / needed if needed else 0.0


def fetch(items: list[tuple[StreamedExperts, int]], keep: set[tuple[str, int]], cancel: threading.Event) -> None:
    for stack, e in items:
        if cancel.is_set():
            return
        stack.prefetch(e, keep)
