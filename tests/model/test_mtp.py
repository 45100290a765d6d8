"""The MTP block against an independent composition of transformers' modules (`reference.transformers_mtp_logits`),
over a whole sequence and through its cache (prompt chunks, then one token at a time)."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.config import tiny_config
from ds4py.loaders.memory import from_tensors
from ds4py.model.init import random_weights
from tests.model.reference import transformers_mtp_logits
from tests.model.test_parity import ids_of, relative_error

CONFIGS = {
    "sliding": tiny_config(),  # the MTP block at layer 4, ratio 0 (V4 Flash's MTP layer is sliding-window only)
    "ratio4": tiny_config(compress_ratios=[0, 4, 128, 0, 4]),  # with its compressor and indexer
    "ratio128": tiny_config(num_hidden_layers=3, compress_ratios=[4, 0, 128, 128]),
}


def ours_mtp_logits(model, ids: list[int], next_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    t = model.transformer
    cache, mtp_cache = model.new_cache(), t.new_mtp_cache()
    chunk = chunk or len(ids)
    outs = []
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            streams = t.forward_streams(torch.tensor(ids[s:s + chunk]), cache)
            hidden = t.mtp_forward(streams, torch.tensor(next_ids[s:s + chunk]), s, mtp_cache)
            outs.append(t.logits(hidden))
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mtp_logits_match_the_reference(name):
    config = CONFIGS[name]
    weights = random_weights(config, seed=4)
    seq = ids_of(301, config.vocab_size, seed=9)
    ids, next_ids = seq[:-1], seq[1:]
    ref = transformers_mtp_logits(config, weights, ids, next_ids)
    model = ds4py.load(from_tensors(config, weights))
    ours = ours_mtp_logits(model, ids, next_ids)
    assert ours.shape == (300, config.vocab_size)
    assert relative_error(ours, ref) < 1e-4  # reached: 8.1e-7, 8.7e-7 and 7.3e-7 on the three configs
    stepped = torch.cat([ours_mtp_logits(model, ids[:290], next_ids[:290], chunk=97)])
    assert relative_error(stepped, ref[:290]) < 1e-4


def test_mtp_cache_decodes_like_a_full_pass():
    config = CONFIGS["ratio4"]
    model = ds4py.load(from_tensors(config, random_weights(config, seed=4)))
    seq = ids_of(281, config.vocab_size, seed=9)
    ids, next_ids = seq[:-1], seq[1:]
    full = ours_mtp_logits(model, ids, next_ids)
    one = ours_mtp_logits(model, ids, next_ids, chunk=1)  # every position through the one-token paths
    assert (one - full).abs().max().item() < 1e-4
