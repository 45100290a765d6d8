"""Perplexity of a text the way llama.cpp's llama-perplexity computes it, so numbers compare across
engines: the tokens (with BOS when the vocabulary adds one) are cut into chunks of `ctx` tokens, the
first token of each chunk is replaced by BOS, and only the second half of each chunk is scored."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds4py.errors import Ds4pyError


@dataclass
class PerplexityResult:
    ppl: float
    error: float          # the +/- llama-perplexity prints
    n_tokens_scored: int
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk


def perplexity(
    logits_of: Callable[[list[int]], torch.Tensor],
    tokens: list[int],
    ctx: int,
    bos_id: int | None,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """`logits_of(ids)` -> [len, vocab] logits; `tokens` the whole text's ids (BOS included if added)."""
    if ctx < 4:
        raise Ds4pyError(f"--ctx {ctx} is too small for a perplexity run: use at least 4")
    if len(tokens) < 2 * ctx:
        raise Ds4pyError(
            f"the text tokenizes to {len(tokens)} tokens; a perplexity run with --ctx {ctx} needs at least "
            f"{2 * ctx}: give a longer file or a smaller --ctx"
        )
    n_chunk = len(tokens) // ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    for i in range(n_chunk):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if bos_id is not None:
            chunk = [bos_id] + chunk[1:]
        logp = torch.log_softmax(logits_of(chunk)[first:ctx - 1].double(), dim=-1)  # predicts first+1 ..
        target = torch.tensor(chunk[first + 1:ctx], device=logp.device)
        token_nll = -logp.gather(1, target[:, None]).squeeze(1)
        nll += token_nll.sum().item()
        nll2 += token_nll.square().sum().item()
        count += ctx - first - 1
        running.append(math.exp(nll / count))
        if on_chunk:
            on_chunk(i + 1, running[-1])
    mean, mean2 = nll / count, nll2 / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 else 0.0
    return PerplexityResult(ppl=ppl, error=err * ppl, n_tokens_scored=count, chunk_ppl=running)
