"""Greedy speculative decoding with the model's own MTP block as the drafter (DeepSeek V3/V4's multi-token
prediction used for decoding).

Each step feeds the last chosen token g and the MTP block's guess d at the token after it in one call of two
tokens, so every weight is read once for both:
- the logits at g give the true next token a; if a == d the guess is accepted and the logits at d give one more
  token for free (two tokens for one pass of the main model);
- otherwise d is dropped from the cache (`Cache.drop_last`: nothing is recomputed) and a is the step's one token.
The MTP block then reads the main model's streams at the positions just confirmed, with the tokens after them,
and guesses the next d. The tokens are the main model's greedy choices whatever the guesses are: the same as
plain greedy decoding, up to the float rounding between a two-token call and a one-token call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ds4py.engine import Model, Step
from ds4py.errors import Ds4pyError
from ds4py.sampling import greedy


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
def speculative_greedy(model: Model, prompt_ids: list[int], max_new_tokens: int,
                       stop_token_ids: set[int] | None = None, stats: SpeculativeStats | None = None,
                       guess=None) -> Iterator[Step]:
    """Yield the greedy continuation of `prompt_ids` token by token, as `Model.stream` with greedy choices.
    `guess(mtp_hidden [1, D]) -> token` replaces the MTP head's argmax (tests use it to force acceptances and
    rejections)."""
    t = model.transformer
    if t.mtp is None:
        raise Ds4pyError("speculative decoding needs the model's MTP block (mtp.0.*), which this model does not have "
                         "or this memory mode does not load: decode without it")
    if not prompt_ids:
        raise Ds4pyError("nothing to prefill: the prompt is empty")
    # as plain decoding's: a step feeds a token and its guess only while one more token is wanted, so the cache holds
    # at most the prompt and all but the last new token
    model.check_fits(len(prompt_ids) + max_new_tokens)
    stats = stats if stats is not None else SpeculativeStats()
    stop = stop_token_ids if stop_token_ids is not None else set(model.config.eos_token_ids)
    guess = guess or (lambda h: greedy(t.logits(h)[0]))
    cache, mtp_cache = model.new_cache(), t.new_mtp_cache()

    # the prompt, in chunks; the MTP block follows one position behind (a position's next token must be known)
    carry = None  # [1, hc, D] the streams of the last position the MTP block has not read
    ids = torch.tensor(prompt_ids, dtype=torch.long)
    for start in range(0, len(prompt_ids), model.prefill_chunk):
        chunk = ids[start:start + model.prefill_chunk]
        streams = t.forward_streams(chunk, cache)
        if carry is not None:
            streams_in = torch.cat([carry, streams[:-1]])
            t.mtp_forward(streams_in, chunk, start - 1, mtp_cache)
        elif streams.shape[0] > 1:
            t.mtp_forward(streams[:-1], chunk[1:], start, mtp_cache)
        carry = streams[-1:]
    logits = t.logits(t.final_hidden(carry))[0]
    token = greedy(logits)
    yield Step(token, logits)
    produced = 1
    if token in stop or produced >= max_new_tokens:
        return
    last = torch.tensor([token])
    draft = guess(t.mtp_forward(carry, last, cache.length - 1, mtp_cache))

    while True:
        n = cache.length  # the position of `token`
        t0 = time.perf_counter()
        streams = t.forward_streams(torch.tensor([token, draft]), cache)  # [2, hc, D]
        logits2 = t.logits(t.final_hidden(streams))                     # [2, vocab]
        stats.main_seconds += time.perf_counter() - t0
        stats.steps += 1
        nxt = greedy(logits2[0])
        if nxt == draft:
            stats.accepted += 1
            after = greedy(logits2[1])
            for tok, lg in ((draft, logits2[0]), (after, logits2[1])):
                yield Step(tok, lg)
                produced += 1
                if tok in stop or produced >= max_new_tokens:
                    return
            confirmed, token = [draft, after], after
        else:
            cache.drop_last()
            yield Step(nxt, logits2[0])
            produced += 1
            if nxt in stop or produced >= max_new_tokens:
                return
            confirmed, token = [nxt], nxt
        t0 = time.perf_counter()  # the MTP block reads the confirmed positions, with the tokens after them
        hidden = t.mtp_forward(streams[:len(confirmed)], torch.tensor(confirmed), n, mtp_cache)[-1:]
        draft = guess(hidden)
        stats.mtp_seconds += time.perf_counter() - t0

