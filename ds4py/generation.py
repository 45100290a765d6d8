"""Text in, text out: sample tokens from a Model, detokenize them incrementally, stop on stop
strings and end-of-sequence tokens, and time prompt processing and generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ds4py.cache import Cache
from ds4py.engine import Model
from ds4py.errors import Ds4pyError
from ds4py.sampling import Sampler, SamplingParams, StopMatcher, TokenInfo
from ds4py.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, reused from a cache rather than computed
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    finish_reason: str = "length"
    stopped_by: str | None = None  # "eos" or "string" when finish_reason is "stop"

    def summary(self) -> str:
        pp = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        tg = (self.generated_tokens - 1) / self.generation_seconds if self.generation_seconds else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | generation: {self.generated_tokens} "
                f"tokens, {tg:.1f} tok/s | finish: {self.finish_reason}")


@dataclass
class Delta:
    """What one decode step produced: the token, its log-probability info, and the text it released
    (possibly empty: text is held back while it could be half a UTF-8 character or a stop string)."""

    token: int
    info: TokenInfo
    text: str


class Decoding:
    """One sequence's generation as a state machine, so a scheduler can interleave many:
    `prefill_step()` until it returns True, then `decode_step()` until `finished`."""

    def __init__(self, model: Model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 cache: Cache | None = None, prefill_chunk: int | None = None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        self.cache = cache if cache is not None else model.new_cache()
        if self.cache.tokens != self.prompt_ids[: self.cache.length]:
            raise ValueError("the cache does not hold a prefix of this prompt")
        model.check_fits(len(self.prompt_ids) + params.max_tokens)
        self.prefill_chunk = prefill_chunk or model.prefill_chunk
        self.sampler = Sampler(params, model.config.vocab_size, n_prompt=len(self.prompt_ids))
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopMatcher(params.stop or [])
        eos = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            eos |= set(tokenizer.eos_ids or model.config.eos_token_ids)
        self.eos = eos
        self.logits: torch.Tensor | None = None  # [vocab] the next token's logits
        self.tokens: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids), cached_tokens=self.cache.length)
        self.finished = False

    @property
    def prefilled(self) -> bool:
        return self.logits is not None

    def prefill_step(self) -> bool:
        """Feed the next chunk of the prompt; True once the whole prompt is in."""
        if self.logits is not None:
            return True
        t0 = time.perf_counter()
        rest = self.prompt_ids[self.cache.length:]
        if not rest:
            raise ValueError("the cache already holds the whole prompt; give its logits with set_logits")
        chunk = rest[: self.prefill_chunk]
        logits = self.model.prefill(chunk, self.cache)
        self.stats.prompt_seconds += time.perf_counter() - t0
        if len(chunk) == len(rest):
            self.logits = logits
            self._t_decode = time.perf_counter()
        return self.logits is not None

    def set_logits(self, logits: torch.Tensor) -> None:
        """The cache holds the whole prompt already (a reused prefix): start decoding from these logits."""
        self.logits = logits
        self._t_decode = time.perf_counter()

    def decode_step(self) -> Delta:
        """Sample the next token and, unless that finished the sequence, feed it."""
        delta = self.choose()
        if not self.finished:
            self.feed(self.model.prefill([delta.token], self.cache))
        return delta

    def choose(self) -> Delta:
        """Sample the next token from the current logits and release its text; the caller feeds the
        token back (`feed`) unless the sequence finished. Split so a scheduler can feed many at once."""
        return self.take(*self.sampler.sample(self.logits, self.prompt_ids + self.tokens))

    def take(self, token: int, info: TokenInfo) -> Delta:
        """`choose` for a token chosen elsewhere (speculative decoding's): append it, release its text, finish on
        an end-of-sequence token, a stop string or max_tokens."""
        self.tokens.append(token)
        self.stats.generated_tokens += 1
        text, stopped = "", False
        if token in self.eos:
            self.finish("stop")
            self.stats.stopped_by = "eos"
        else:
            text, stopped = self.stops.feed(self.decoder.feed(token))
            if stopped:
                self.finish("stop")
                self.stats.stopped_by = "string"
            elif len(self.tokens) >= self.params.max_tokens:
                self.finish("length")
        if self.finished and not stopped:
            tail, _ = self.stops.feed(self.decoder.flush())
            text += tail + self.stops.flush()
        self.stats.generation_seconds = time.perf_counter() - self._t_decode
        return Delta(token, info, text)

    def feed(self, logits: torch.Tensor) -> None:
        """The logits after the last chosen token was fed to the cache."""
        self.logits = logits

    def finish(self, reason: str) -> None:
        self.finished = True
        self.stats.finish_reason = reason


class TextGeneration:
    """Iterate for text deltas; `tokens` and `stats` fill in as it runs. `speculative`: with the MTP block's guesses
    (`ds4py.speculative`; its counts in `speculative_stats`): greedy, the same tokens as without; sampled, the same
    distribution."""

    def __init__(self, model: Model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 cache: Cache | None = None, speculative: bool = False):
        self.speculative_stats = None
        if speculative:
            from ds4py.speculative import NO_MTP_BLOCK, SpeculativeStats

            if model.transformer.mtp is None:
                raise Ds4pyError(NO_MTP_BLOCK)
            if cache is not None and cache.length and not cache.mtp_in_step:
                raise Ds4pyError("this cache was filled without speculative decoding, so its MTP block has not read "
                                 "it: start from a new cache, or decode without speculative decoding")
            self.speculative_stats = SpeculativeStats()
        self.decoding = Decoding(model, tokenizer, prompt_ids, params, cache)

    @property
    def tokens(self) -> list[int]:
        return self.decoding.tokens

    @property
    def stats(self) -> GenerationStats:
        return self.decoding.stats

    def __iter__(self) -> Iterator[str]:
        if self.speculative_stats is not None:
            yield from self.speculative()
            return
        d = self.decoding
        while not d.prefill_step():
            pass
        while not d.finished:
            delta = d.decode_step()
            if delta.text:
                yield delta.text

    def speculative(self) -> Iterator[str]:
        steps = SpeculativeSteps(self.decoding, self.speculative_stats)
        while not self.decoding.finished:
            delta = steps.next()
            if delta.text:
                yield delta.text


class SpeculativeSteps:
    """A Decoding's tokens as `speculative_decode` chooses them with its sampler and cache, one a call, each through
    `Decoding.take` for its text, end-of-sequence and stop strings (`TextGeneration`'s and the server's)."""

    def __init__(self, decoding: Decoding, stats=None, chunks: bool = False):
        from ds4py.speculative import speculative_decode

        d = self.decoding = decoding
        self.steps = speculative_decode(d.model, d.prompt_ids, d.params.max_tokens, set(), stats, d.sampler,
                                        cache=d.cache, chunks=chunks)
        self.started = False

    def next(self) -> Delta | None:
        """The next token's delta; the first call feeds the prompt (its time is the prompt's), or with `chunks` one
        chunk of it a call (None until the last)."""
        d = self.decoding
        t0 = time.perf_counter()
        step = next(self.steps)
        if not self.started:
            d.stats.prompt_seconds += time.perf_counter() - t0
            if step is None:
                return None
            self.started = True
            d._t_decode = time.perf_counter()
        d.feed(step.logits)
        delta = d.take(step.token, d.sampler.info(step.logits, step.token))
        if d.finished:
            self.steps.close()
        return delta


def generate_text(model: Model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                  cache: Cache | None = None, speculative: bool = False) -> TextGeneration:
    return TextGeneration(model, tokenizer, list(prompt_ids), params, cache, speculative)
