"""The prefill/decode loop of one sequence over a Transformer and its Cache.

`Model` is the Python API: `logits(ids)`, `generate(ids, ...)`, `stream(ids, ...)`. Prefill runs in
chunks of `prefill_chunk` tokens through the same cached path decoding uses, so what `logits` returns
is what generation sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ds4py.cache import Cache
from ds4py.config import ModelConfig
from ds4py.errors import ContextOverflowError, Ds4pyError
from ds4py.model.transformer import Transformer
from ds4py.sampling import greedy


@dataclass
class Step:
    """One generated token and the distribution it came from."""

    token: int
    logits: torch.Tensor  # [vocab] float32, the raw logits before sampling


def default_prefill_chunk(config: ModelConfig, streaming: bool = False) -> int:
    """Tokens per prefill chunk: 256 at V4 Flash's width; a narrow model's chunks grow until they hold 64K hidden
    values (at most 1024 tokens), since there a chunk's fixed cost (~1000 calls from Python, ~2-3 ms on 2 cores)
    is a large part of its time: the tiny preset's 512-token prompt ran 43 -> 48K tok/s as one chunk.
    With the weights resident (not `streaming`: there memory is what binds, and a chunk's working memory grows with
    it), 512 where a chunk of 256 would give each routed expert fewer than 8 tokens (256 experts, 6 active: all of a
    layer's experts are read once per chunk, so fewer chunks read less). On 2 Zen 5 cores, alternated (pp512 tok/s,
    chunks of 256 / 512): flash-slice, 256 experts, 326 / 354; flash-slice-few, 16 experts, 366 / 343 (pp1024 on
    the flash-slice: 372 / 369 with chunks of 512 / 1024)."""
    chunk = max(256, (1 << 16) // config.hidden_size)
    if not streaming and 256 * config.num_experts_per_tok < 8 * config.n_routed_experts:
        chunk = max(chunk, 512)
    return min(1024, chunk)


class Model:
    def __init__(self, transformer: Transformer, ctx: int | None = None, prefill_chunk: int | None = None,
                 source=None):
        self.transformer = transformer
        self.config: ModelConfig = transformer.config
        self.ctx = ctx or self.config.max_position_embeddings
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(self.config)
        self.source = source  # the WeightSource it was loaded from (path, metadata)

    # --- the cached path ---------------------------------------------------------------------
    def new_cache(self) -> Cache:
        return self.transformer.new_cache()

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], cache: Cache, all_logits: bool = False) -> torch.Tensor:
        """Feed `token_ids` after what `cache` holds; return the last position's logits [vocab]
        (or every position's [T, vocab] with all_logits)."""
        self.check_fits(cache.length + len(token_ids))
        if not token_ids:
            raise Ds4pyError("nothing to prefill: the prompt is empty")
        ids = torch.tensor(token_ids, dtype=torch.long)
        outs = []
        for start in range(0, len(token_ids), self.prefill_chunk):
            chunk = ids if len(token_ids) <= self.prefill_chunk else ids[start:start + self.prefill_chunk]
            hidden = self.transformer.forward(chunk, cache)
            if all_logits:
                outs.append(self.transformer.logits(hidden))
        # the head (V4 Flash: a 1 GB matrix) is read once for the prompt's last position, not once per chunk
        return torch.cat(outs) if all_logits else self.transformer.logits(hidden[-1:])[0]

    @torch.inference_mode()
    def decode_batch(self, token_ids: list[int], caches: list[Cache]) -> torch.Tensor:
        """Feed one token to each of several sequences at once (each weight is read once for all of
        them) -> the next logits [B, vocab]. Equal to B separate `prefill([t], cache)` calls up to
        float rounding of the batched matmuls."""
        for c in caches:
            self.check_fits(c.length + 1)
        hidden = self.transformer.decode_batch(torch.tensor(token_ids, dtype=torch.long), caches)
        return self.transformer.logits(hidden)

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.ctx:
            raise ContextOverflowError(
                f"{n_tokens} tokens do not fit in the context of {self.ctx}: shorten the prompt or "
                f"ask for fewer new tokens, or raise --ctx (the model allows up to "
                f"{self.config.max_position_embeddings})"
            )

    # --- the public API --------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: the logits at every position."""
        return self.prefill(list(token_ids), self.new_cache(), all_logits=True)

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        choose: Callable[[torch.Tensor, list[int]], int],
        stop_token_ids: set[int] | None = None,
        cache: Cache | None = None,
    ) -> Iterator[Step]:
        """Yield generated tokens one at a time. `choose(logits, ids_so_far)` picks each token.
        `cache` may already hold a prefix of `prompt_ids` (it is extended in place)."""
        cache = cache if cache is not None else self.new_cache()
        if cache.tokens != list(prompt_ids[: cache.length]):
            raise ValueError("the cache does not hold a prefix of this prompt")
        self.check_fits(len(prompt_ids) + max_new_tokens)
        ids = list(prompt_ids)
        rest = ids[cache.length:]
        if not rest:
            raise ValueError("the cache already holds the whole prompt; keep at least one token to feed")
        logits = self.prefill(rest, cache)
        stop = stop_token_ids if stop_token_ids is not None else set(self.config.eos_token_ids)
        for i in range(max_new_tokens):
            token = choose(logits, ids)
            ids.append(token)
            yield Step(token, logits)
            if token in stop or i == max_new_tokens - 1:
                return
            logits = self.prefill([token], cache)

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, seed: int | None = None,
        stop_token_ids: set[int] | None = None, speculative: bool = False,
    ) -> list[int]:
        """The new token ids (greedy at temperature 0), stopping after an end-of-sequence token. `speculative`:
        the MTP block's guesses checked two tokens a call (`ds4py.speculative`: greedy, the same tokens; sampled, the
        same distribution, other draws)."""
        if speculative:
            from ds4py.sampling import Sampler, SamplingParams
            from ds4py.speculative import speculative_decode

            sampler = Sampler(SamplingParams(temperature=temperature, seed=seed), self.config.vocab_size,
                              len(prompt_ids))
            return [s.token for s in speculative_decode(self, prompt_ids, max_new_tokens, stop_token_ids,
                                                        sampler=sampler)]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def choose(logits: torch.Tensor, _ids: list[int]) -> int:
            if temperature <= 0:
                return greedy(logits)
            probs = torch.softmax(logits / temperature, dim=-1)
            return int(torch.multinomial(probs.cpu(), 1, generator=gen))

        return [s.token for s in self.stream(prompt_ids, max_new_tokens, choose, stop_token_ids)]
