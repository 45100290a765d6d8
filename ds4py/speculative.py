"""Speculative decoding with the model's own MTP block as the drafter (DeepSeek V3/V4's multi-token prediction
used for decoding), greedy or sampled.

Each step feeds the last chosen token g and the MTP block's guess d at the token after it in one call of two
tokens, so every weight is read once for both:
- the logits at g give the true next token a; if a == d the guess is accepted and the logits at d give one more
  token for free (two tokens for one pass of the main model);
- otherwise d is dropped from the cache (`Cache.drop_last`: nothing is recomputed) and a is the step's one token.
The MTP block then reads the main model's streams at the positions just confirmed, with the tokens after them,
and guesses the next d. Greedy, the tokens are the main model's choices whatever the guesses are: plain greedy
decoding's, up to the float rounding between a two-token call and a one-token call. Sampled (Leviathan et al.,
"Fast Inference from Transformers via Speculative Decoding", 2023), d is drawn from the sampler's distribution q
over the MTP block's logits and kept with probability min(1, p(d) / q(d)) under the main model's p (the same
penalties, filters and temperature); else the token is drawn from max(0, p - q), normalised. Each token then has
plain sampling's distribution, though a seed gives other tokens than plain sampling's (the draws differ)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ds4py.cache import Cache
from ds4py.engine import Model, Step
from ds4py.errors import Ds4pyError
from ds4py.sampling import Sampler, SamplingParams, draw

NO_MTP_BLOCK = ("speculative decoding needs the model's MTP block (mtp.0.*), which this model does not have: give "
                "--mtp-file (llama.cpp's mtp-*.gguf) or a GGUF converted with --mtp, or decode without it")


@dataclass
class SpeculativeStats:
    steps: int = 0     # two-token calls of the main model
    accepted: int = 0  # guesses the main model confirmed
    main_seconds: float = 0.0  # in those calls, the head's logits included
    mtp_seconds: float = 0.0   # in the MTP block's calls after the prompt, its guess's logits included

    @property
    def acceptance(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


@torch.inference_mode()
def speculative_decode(model: Model, prompt_ids: list[int], max_new_tokens: int,
                       stop_token_ids: set[int] | None = None, stats: SpeculativeStats | None = None,
                       sampler: Sampler | None = None, draft_logits=None, cache: Cache | None = None,
                       chunks: bool = False) -> Iterator[Step | None]:
    """Yield the continuation of `prompt_ids` token by token, as `Model.stream`, each token chosen by `sampler`'s
    rules (default: greedy). `cache` may hold a prefix of the prompt that speculative decoding left (the MTP block's
    state with it: a previous turn's); it is extended in place. `draft_logits(mtp_hidden [1, D], ids) -> logits
    [vocab]` replaces the MTP head's logits for the guess at the token after `ids` (tests use it to force
    acceptances and rejections). `chunks`: yield None after each prompt chunk but the last (a scheduler's turn)."""
    t = model.transformer
    if t.mtp is None:
        raise Ds4pyError(NO_MTP_BLOCK)
    if not prompt_ids:
        raise Ds4pyError("nothing to prefill: the prompt is empty")
    # as plain decoding's: a step feeds a token and its guess only while one more token is wanted, so the cache holds
    # at most the prompt and all but the last new token
    model.check_fits(len(prompt_ids) + max_new_tokens)
    stats = stats if stats is not None else SpeculativeStats()
    stop = stop_token_ids if stop_token_ids is not None else set(model.config.eos_token_ids)
    sampler = sampler or Sampler(SamplingParams(), model.config.vocab_size, len(prompt_ids))
    sampled = sampler.params.temperature > 0
    draft_logits = draft_logits or (lambda h, _ids: t.logits(h)[0])
    cache = cache if cache is not None else model.new_cache()
    if cache.tokens != list(prompt_ids[: cache.length]):
        raise ValueError("the cache does not hold a prefix of this prompt")
    if cache.length >= len(prompt_ids):
        raise ValueError("the cache already holds the whole prompt; keep at least one token to feed")
    if not cache.length:
        cache.mtp, cache.mtp_length, cache.mtp_lag = t.new_mtp_cache(), 0, None
    elif not cache.mtp_in_step:
        raise Ds4pyError("this cache was filled without speculative decoding, so its MTP block has not read it: "
                         "start from a new cache, or decode without speculative decoding")
    mtp_cache = cache.mtp

    def mtp_read(streams: torch.Tensor | None, next_ids: list[int]) -> torch.Tensor:
        """The MTP block over the lagging streams, then `streams` [k, hc, D] (positions after them), with the tokens
        after each -> its hidden states; nothing lags after."""
        rows = [r for r in (cache.mtp_lag, streams) if r is not None]
        x = torch.cat(rows) if len(rows) > 1 else rows[0]
        hidden = t.mtp_forward(x, torch.tensor(next_ids), cache.mtp_length, mtp_cache)
        cache.mtp_length += x.shape[0]
        cache.mtp_lag = None
        return hidden

    def guess(hidden: torch.Tensor, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """The guess at the token after `ids` -> (it, the distribution q it was drawn from when sampling)."""
        logits = draft_logits(hidden, ids)
        if not sampled:
            return sampler.pick(logits, ids), None
        q = sampler.probs(logits, ids)
        return draw(q, sampler.generator), q

    def check(logits: torch.Tensor, ids: list[int], draft: int, q: torch.Tensor | None) -> int:
        """The token after `ids` given the main model's logits and the guess: the guess itself if kept."""
        if not sampled:
            return sampler.pick(logits, ids)
        p = sampler.probs(logits, ids)
        ratio = float(p[draft]) / float(q[draft])
        if ratio >= 1 or float(torch.rand((), generator=sampler.generator, dtype=torch.float64)) < ratio:
            return draft
        residual = (p - q).clamp_(min=0)  # `draw` normalises
        return draw(residual if float(residual.sum()) > 0 else p, sampler.generator)  # (p ~ q within rounding: p)

    # the prompt's rest, in chunks; the MTP block follows one position behind (a position's next token must be known)
    ids = list(prompt_ids)
    for start in range(cache.length, len(ids), model.prefill_chunk):
        streams = t.forward_streams(torch.tensor(ids[start:start + model.prefill_chunk]), cache)
        if streams.shape[0] > 1 or cache.mtp_lag is not None:
            mtp_read(streams[:-1] if streams.shape[0] > 1 else None, ids[cache.mtp_length + 1: cache.length])
        cache.mtp_lag = streams[-1:].clone()
        if chunks and cache.length < len(ids):
            yield None
    logits = t.logits(t.final_hidden(cache.mtp_lag))[0]
    token = sampler.pick(logits, ids)
    ids.append(token)
    yield Step(token, logits)
    if token in stop or len(ids) - len(prompt_ids) >= max_new_tokens:
        return
    draft, q = guess(mtp_read(None, [token]), ids)

    while True:
        t0 = time.perf_counter()
        streams = t.forward_streams(torch.tensor([token, draft]), cache)  # [2, hc, D]
        logits2 = t.logits(t.final_hidden(streams))                     # [2, vocab]
        stats.main_seconds += time.perf_counter() - t0
        stats.steps += 1
        nxt = check(logits2[0], ids, draft, q)
        if nxt == draft:
            stats.accepted += 1
            confirmed = [draft]
            ids.append(draft)
            cache.mtp_lag = streams.clone()  # both positions: read with the tokens after them, once known
            yield Step(draft, logits2[0])
            if draft in stop or len(ids) - len(prompt_ids) >= max_new_tokens:
                return
            after = sampler.pick(logits2[1], ids)
            confirmed.append(after)
        else:
            cache.drop_last()
            cache.mtp_lag = streams[:1].clone()
            confirmed, after = [nxt], nxt
            logits2 = logits2[:1]
        ids.append(after)
        yield Step(after, logits2[-1])
        if after in stop or len(ids) - len(prompt_ids) >= max_new_tokens:
            return
        token = after
        t0 = time.perf_counter()  # the MTP block reads the confirmed positions, with the tokens after them
        draft, q = guess(mtp_read(None, confirmed)[-1:], ids)
        stats.mtp_seconds += time.perf_counter() - t0
