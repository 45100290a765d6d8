"""The engine thread: one worker runs the model for every request, interleaving them. Each round it
gives every active request one step: a prefill chunk for those still reading their prompt, and one
token for all the others, decoded together in one batched step (each weight read once for all). A long
prompt or a long answer never holds the others up for more than a step. Requests beyond `parallel` wait in a bounded
queue; beyond that, `submit` refuses (the HTTP layer answers 503). A cancelled request (its client went
away) leaves at the next round, freeing its slot.

With `speculative` (`ds4py serve --speculative`), each request decodes with its MTP block's guesses instead
(`ds4py.speculative`): a round gives each a prompt chunk or one token, a two-token call every other round where
guesses are kept; requests are not batched together then. The prefix cache keeps their caches with the MTP block's
state, so later turns continue from them."""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ds4py.engine import Model
from ds4py.generation import Decoding, Delta, GenerationStats, SpeculativeSteps
from ds4py.sampling import SamplingParams
from ds4py.server.prefix_cache import PrefixCache
from ds4py.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str                       # "delta", "done" or "error"
    delta: Delta | None = None
    stats: GenerationStats | None = None
    error: Exception | None = None


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]   # called on the engine thread; must be thread-safe and quick
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoding: Decoding | None = None
    steps: SpeculativeSteps | None = None  # speculative decoding's tokens


@dataclass
class Counters:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


class Scheduler:
    def __init__(self, model: Model, tokenizer: Tokenizer, parallel: int = 4, max_queue: int = 64,
                 prefix_cache: PrefixCache | None = None, prefill_chunk: int | None = None, speculative: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.speculative = speculative
        self.parallel, self.max_queue = parallel, max_queue
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        # the model's chunk (None), as `ds4py run` and `Model.logits` feed a prompt, so the server's answer to a
        # prompt is theirs bit for bit (a product's bits can depend on how many rows it has)
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.counters = Counters()
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ds4py-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.counters.rejected += 1
                raise QueueFull(f"{len(self.active)} requests running and {len(self.waiting)} waiting")
            self.counters.requests += 1
            self.waiting.append(job)
            self.cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # --- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.active:
                    self.cv.wait()
                if self.stopping:
                    break
                while self.waiting and len(self.active) < self.parallel:
                    self.active.append(self.waiting.popleft())
                jobs = list(self.active)
            decoding = []
            for job in jobs:
                if job.cancelled.is_set():
                    self._leave(job)
                    self.counters.cancelled += 1
                elif job.steps is not None:
                    self._guarded(self._speculative_step, job)
                elif job.decoding is not None and job.decoding.prefilled:
                    decoding.append(job)
                else:
                    self._guarded(self._prefill_step, job)
            self._decode_round(decoding)
        for job in self.active + list(self.waiting):
            job.emit(Event("error", error=RuntimeError("the server is shutting down")))

    def _leave(self, job: Job) -> None:
        with self.cv:
            if job in self.active:
                self.active.remove(job)
            elif job in self.waiting:
                self.waiting.remove(job)

    def _guarded(self, step, job: Job) -> bool:
        try:
            step(job)
            return True
        except Exception as e:  # a failed request must not take the server down
            self._fail(job, e)
            return False

    def _fail(self, job: Job, e: Exception) -> None:
        traceback.print_exc()
        self.counters.failed += 1
        self._leave(job)
        job.emit(Event("error", error=e))

    def _prefill_step(self, job: Job) -> None:
        """Start a job (from the longest cached prefix) or feed it the next chunk of its prompt."""
        d = job.decoding
        if d is None and self.speculative:  # from a cached prefix that speculative decoding left, with a token to feed
            found = self.prefix_cache.lookup(job.prompt_ids[:-1])
            cache = found[0] if found and found[0].mtp_in_step else None
            job.decoding = Decoding(self.model, self.tokenizer, job.prompt_ids, job.params, cache,
                                    prefill_chunk=self.prefill_chunk)
            job.steps = SpeculativeSteps(job.decoding, chunks=True)
            self._speculative_step(job)
            return
        if d is None:
            found = self.prefix_cache.lookup(job.prompt_ids)
            cache, logits = found if found else (None, None)
            d = job.decoding = Decoding(self.model, self.tokenizer, job.prompt_ids, job.params, cache,
                                        prefill_chunk=self.prefill_chunk)
            if logits is not None:
                d.set_logits(logits)
                return
        if d.prefill_step():
            self.prefix_cache.store(d.cache, d.logits)  # the prompt's state: the next turn starts with it

    def _decode_round(self, jobs: list[Job]) -> None:
        """Every decoding job samples a token; those that go on are fed together in one batched step
        (each weight read once for all of them)."""
        going = []
        for job in jobs:
            if self._guarded(self._choose, job) and not job.decoding.finished:
                going.append(job)
        if not going:
            return
        try:
            if len(going) == 1:
                d = going[0].decoding
                d.feed(self.model.prefill([d.tokens[-1]], d.cache))
                return
            logits = self.model.decode_batch([j.decoding.tokens[-1] for j in going], [j.decoding.cache for j in going])
            for job, row in zip(going, logits):
                job.decoding.feed(row)
        except Exception as e:
            for job in going:
                self._fail(job, e)

    def _speculative_step(self, job: Job) -> None:
        """A chunk of the prompt (None: no token yet) or one token."""
        first = not job.steps.started
        delta = job.steps.next()
        if delta is None:
            return
        if first and not job.decoding.finished:
            self.prefix_cache.store(job.decoding.cache)  # the prompt's state (the MTP block's with it)
        self._emit(job, delta)

    def _choose(self, job: Job) -> None:
        self._emit(job, job.decoding.choose())

    def _emit(self, job: Job, delta: Delta) -> None:
        d = job.decoding
        job.emit(Event("delta", delta=delta))
        if d.finished:
            self._leave(job)
            c, s = self.counters, d.stats
            c.finished += 1
            c.prompt_tokens += s.prompt_tokens
            c.cached_tokens += s.cached_tokens
            c.generated_tokens += s.generated_tokens
            c.prompt_seconds += s.prompt_seconds
            c.generation_seconds += s.generation_seconds
            self.prefix_cache.store(d.cache, copy=False)  # prompt + answer (but its last token)
            job.emit(Event("done", stats=s))
