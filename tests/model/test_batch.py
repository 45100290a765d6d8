"""Batched decoding (one token for each of several sequences per step, as the server does) gives what
decoding each sequence alone gives: same logits up to float rounding, same greedy tokens."""

from __future__ import annotations

import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights
from ds4py.synthetic import make_model


def check_batched_equals_single(model, prompt_lengths, steps: int, atol: float) -> None:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lengths]
    single, batched = [], []
    for p in prompts:  # one at a time
        cache = model.new_cache()
        logits, out = model.prefill(p, cache), []
        for _ in range(steps):
            out.append(logits)
            logits = model.prefill([int(logits.argmax())], cache)
        single.append(out)
    caches = [model.new_cache() for _ in prompts]
    logits = torch.stack([model.prefill(p, c) for p, c in zip(prompts, caches)])
    for _ in range(steps):  # all together
        batched.append(logits)
        logits = model.decode_batch(logits.argmax(-1).tolist(), caches)
    for i in range(len(prompts)):
        ours = torch.stack([b[i] for b in batched])
        ref = torch.stack(single[i])
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
        assert (ours - ref).abs().max().item() < atol


def test_batched_decode_float32():
    config = tiny_config()
    model = ds4py.load(from_tensors(config, random_weights(config, seed=2)))
    # prompts that leave the compressors mid-window, at a boundary, and past a ratio-128 block
    check_batched_equals_single(model, [5, 128, 131, 260], steps=20, atol=1e-4)


def test_batched_decode_gguf(tmp_path):
    """Q8_0/MXFP4 kernels quantize each activation row on its own, so batching changes nothing either."""
    path = tmp_path / "t.gguf"
    make_model(str(path), preset="tiny", seed=1)
    check_batched_equals_single(ds4py.load(str(path)), [7, 130, 20], steps=12, atol=1e-3)
