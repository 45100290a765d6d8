"""Test harness: a real uvicorn server on a loopback port, and a scripted stand-in for the model whose
answers are fixed texts (a tool call, thinking), so the protocol paths can be checked exactly."""

from __future__ import annotations

import socket
import threading
import time
from argparse import Namespace
from collections.abc import Callable

import torch
import uvicorn

from ds4py.cache import Cache
from ds4py.chat import ASSISTANT, EOS
from ds4py.config import ModelConfig
from ds4py.errors import ContextOverflowError


class LiveServer:
    def __init__(self, state):
        from ds4py.server.app import create_app

        self.state = state
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.scheduler.stop()


def serve_args(**overrides) -> Namespace:
    base = dict(model=None, device="cpu", dtype="float32", ctx=None, parallel=4, queue=64, api_key=None, alias="tiny",
                max_tokens=64, prefix_cache="256M", template="v4", memory_budget=None)
    return Namespace(**{**base, **overrides})


class ScriptedModel:
    """Duck-types `ds4py.engine.Model` for the decoding loop: after the last `<｜Assistant｜>` of the
    prompt (and the `<think>`/`</think>` that follows it), it emits `answer(prompt_text)` token by token,
    then EOS."""

    def __init__(self, tokenizer, answer: Callable[[str], str], ctx: int = 4096):
        self.tokenizer, self.answer, self.ctx = tokenizer, answer, ctx
        self.config = ModelConfig(vocab_size=tokenizer.vocab_size)
        self.prefill_chunk = 256
        self.source = None
        self.assistant = tokenizer.token_to_id(ASSISTANT)
        self.eos = tokenizer.token_to_id(EOS)
        self.transformer = None
        self.delay = 0.0  # seconds per call, to make requests overlap in concurrency tests
        self.batch_sizes: list[int] = []
        self.fed: list[int] = []  # the tokens of each prefill call, in order

    def new_cache(self) -> Cache:
        return Cache([])

    def check_fits(self, n: int) -> None:
        if n > self.ctx:
            raise ContextOverflowError(f"{n} tokens do not fit in the context of {self.ctx}")

    def decode_batch(self, token_ids: list[int], caches: list[Cache]) -> torch.Tensor:
        self.batch_sizes.append(len(token_ids))
        return torch.stack([self.prefill([t], c) for t, c in zip(token_ids, caches)])

    def prefill(self, ids: list[int], cache: Cache, all_logits: bool = False) -> torch.Tensor:
        time.sleep(self.delay)
        self.fed.append(len(ids))
        cache.tokens.extend(ids)
        toks = cache.tokens
        if self.assistant not in toks:  # an early prefill chunk: nothing to answer yet
            return torch.zeros(self.config.vocab_size)
        start = len(toks) - 1 - toks[::-1].index(self.assistant) + 2  # past <｜Assistant｜> and </think>
        prompt = self.tokenizer.decode(toks[:start])
        script = self.tokenizer.encode(self.answer(prompt)) + [self.eos]
        k = len(toks) - start
        logits = torch.full((self.config.vocab_size,), -30.0)
        logits[script[min(k, len(script) - 1)]] = 30.0
        return logits
