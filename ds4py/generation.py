"""Text in, text out: sample tokens from a Model, detokenize them incrementally, stop on stop
strings and end-of-sequence tokens, and time prompt processing and generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ds4py.cache import Cache
from ds4py.engine import Model
from ds4py.sampling import Sampler, SamplingParams, StopMatcher
from ds4py.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    finish_reason: str = "length"

    def summary(self) -> str:
        pp = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        tg = (self.generated_tokens - 1) / self.generation_seconds if self.generation_seconds else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | generation: {self.generated_tokens} "
                f"tokens, {tg:.1f} tok/s | finish: {self.finish_reason}")


@dataclass
class TextGeneration:
    """Iterate for text deltas; `tokens` and `stats` fill in as it runs."""

    model: Model
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    cache: Cache | None = None
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[str]:
        sampler = Sampler(self.params, self.model.config.vocab_size, n_prompt=len(self.prompt_ids))
        decoder = StreamDecoder(self.tokenizer)
        stops = StopMatcher(self.params.stop or [])
        eos = set(self.params.stop_token_ids or []) | set(self.tokenizer.eos_ids or self.model.config.eos_token_ids)
        if self.params.ignore_eos:
            eos = set(self.params.stop_token_ids or [])
        cache = self.cache if self.cache is not None else self.model.new_cache()
        self.stats.prompt_tokens = len(self.prompt_ids)
        t0 = time.perf_counter()
        self.model.check_fits(len(self.prompt_ids) + self.params.max_tokens)
        logits = self.model.prefill(self.prompt_ids[cache.length:], cache)
        t1 = time.perf_counter()
        self.stats.prompt_seconds = t1 - t0
        history = list(self.prompt_ids)
        for i in range(self.params.max_tokens):
            token, _info = sampler.sample(logits, history)
            history.append(token)
            self.tokens.append(token)
            self.stats.generated_tokens += 1
            self.stats.generation_seconds = time.perf_counter() - t1
            if token in eos:
                self.stats.finish_reason = "stop"
                break
            text, stopped = stops.feed(decoder.feed(token))
            if text:
                yield text
            if stopped:
                self.stats.finish_reason = "stop"
                return
            if i + 1 < self.params.max_tokens:
                logits = self.model.prefill([token], cache)
        tail, _ = stops.feed(decoder.flush())
        tail += stops.flush()
        if tail:
            yield tail


def generate_text(model: Model, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                  cache: Cache | None = None) -> TextGeneration:
    return TextGeneration(model, tokenizer, list(prompt_ids), params, cache)
