"""Logits -> token: penalties, temperature, top-k, top-p, min-p, seeded draws, top-n log-probabilities,
and stop strings that never leak a partial match.

Order, as llama.cpp's default sampler chain: penalties, top-k, top-p, min-p, temperature, draw.
- repetition_penalty (llama.cpp / CTRL): over the last `penalty_last_n` tokens of prompt and output, a
  positive logit is divided by the penalty, a negative one multiplied;
- presence_penalty / frequency_penalty (OpenAI): over generated tokens, logit -= presence * [count > 0]
  + frequency * count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # how many top alternatives to report per token
    ignore_eos: bool = False


@dataclass
class TokenInfo:
    token: int
    logprob: float                                        # under the model's distribution
    top: list[tuple[int, float]] = field(default_factory=list)


def apply_penalties(logits: torch.Tensor, p: SamplingParams, previous: list[int], n_prompt: int) -> torch.Tensor:
    if p.repetition_penalty != 1.0 and p.penalty_last_n != 0:
        window = previous[-p.penalty_last_n:] if p.penalty_last_n > 0 else previous
        ids = torch.tensor(sorted(set(window)), dtype=torch.long)
        if len(ids):
            vals = logits[ids]
            logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        counts = Counter(previous[n_prompt:])
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.long)
            c = torch.tensor(list(counts.values()), dtype=logits.dtype)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * c
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask (-inf) the tokens top-k, top-p and min-p rule out."""
    if p.top_k and 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= p.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` [vocab] by inverse CDF (one uniform draw; torch.multinomial spends ~2 ms
    on a 129k vocabulary)."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    # the first index whose cdf exceeds u: cdf rises there, so its probability is > 0 (filtered tokens
    # are never drawn)
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


def greedy(logits: torch.Tensor) -> int:
    """The index of the largest of logits [vocab], the first of equal ones (a NaN counts as the largest):
    torch.argmax's answer. A CPU float tensor goes through numpy's argmax: ~8 us over a 129280-token vocabulary,
    where torch's took 76-141 us on 2 cores (one decoded token of the tiny preset takes ~700)."""
    if logits.dim() == 1 and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return int(logits.detach().numpy().argmax())
    return int(logits.argmax())


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int | None = None, n_prompt: int = 0):
        self.params = params
        self.vocab_size = vocab_size
        self.n_prompt = n_prompt
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def sample(self, logits: torch.Tensor, previous: list[int]) -> tuple[int, TokenInfo]:
        """logits [vocab] float32; previous: every id so far (prompt then output)."""
        token = self.pick(logits, previous)
        return token, self.info(logits, token)

    def pick(self, logits: torch.Tensor, previous: list[int]) -> int:
        """`sample`'s token alone (its draw the same), without the log-probabilities."""
        if self.params.temperature <= 0:
            return greedy(self.penalized(logits, previous))
        return draw(self.probs(logits, previous), self.generator)

    def probs(self, logits: torch.Tensor, previous: list[int]) -> torch.Tensor:
        """The distribution [vocab] a sampled token is drawn from (temperature > 0): penalties, filters,
        temperature."""
        work = filter_logits(self.penalized(logits, previous), self.params)
        return torch.softmax(work / self.params.temperature, dim=-1)

    def penalized(self, logits: torch.Tensor, previous: list[int]) -> torch.Tensor:
        """A float32 CPU copy of logits [vocab] with the penalties applied (the caller's logits are kept)."""
        return apply_penalties(logits.float().cpu().clone(), self.params, previous, self.n_prompt)

    def info(self, logits: torch.Tensor, token: int) -> TokenInfo:
        """`token`'s log-probability (and the top alternatives asked for) under the model's logits [vocab]."""
        p = self.params
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        top = []
        if p.logprobs:
            vals, ids = torch.topk(logp, min(p.logprobs, logp.shape[-1]))
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        return TokenInfo(token, float(logp[token]), top)


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was reached; the stop string itself is dropped)."""
        if self.stopped:
            return "", True
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            i, _ = min(hits)
            out, self.pending, self.stopped = self.pending[:i], "", True
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if s.startswith(self.pending[-n:]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
