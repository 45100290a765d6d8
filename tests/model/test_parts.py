"""Each part of the block against its transformers counterpart, on random inputs."""

from __future__ import annotations

import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref

from ds4py.cache import CompressorState
from ds4py.config import tiny_config
from ds4py.formats import Dense
from ds4py.model.compressor import Compressor
from ds4py.model.hyper_connection import HyperConnection, HyperHead
from ds4py.model.moe import Router
from ds4py.model.rope import ROTATION_BLOCK, Rotary, apply_rope, inv_freq

CONFIG = tiny_config()
HF_CONFIG = DeepseekV4Config(**CONFIG.to_transformers_dict())
g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def test_inv_freq_matches_transformers_default_and_yarn():
    rotary = ref.DeepseekV4RotaryEmbedding(HF_CONFIG)
    assert torch.allclose(inv_freq(8, CONFIG.rope_theta), rotary.main_inv_freq)
    assert torch.allclose(inv_freq(8, CONFIG.compress_rope_theta, CONFIG.yarn), rotary.compress_inv_freq)
    assert not torch.allclose(rotary.compress_inv_freq, inv_freq(8, CONFIG.compress_rope_theta))


def test_interleaved_partial_rope_and_its_inverse():
    x = randn(5, 3, 32)
    positions = torch.arange(10, 15)
    cos, sin = Rotary.make(8, 10000.0, None).cos_sin(positions)
    ours = apply_rope(x, cos, sin)
    theirs = ref.apply_rotary_pos_emb(x.transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours[..., :24], x[..., :24])  # the rope slice is the last 8 channels
    assert torch.allclose(apply_rope(ours, cos, -sin), x, atol=1e-5)


def test_a_decoding_tokens_rotation_is_its_row_of_a_prompts():
    """One position's rotation comes from a block of ROTATION_BLOCK made at once: the same values as the rotation
    of a prompt's positions, across block boundaries and far positions."""
    rotary = Rotary.make(64, CONFIG.compress_rope_theta, CONFIG.yarn)
    for start in (0, ROTATION_BLOCK - 3, 5 * ROTATION_BLOCK + 7, 1048570):
        prompt = torch.complex(*rotary.cos_sin(torch.arange(start, start + 10)))
        for i in range(10):
            one = rotary.rotation(torch.tensor([start + i]))
            assert one.shape == (1, 32) and torch.equal(one, prompt[i:i + 1]), start + i


def test_hyper_connection_matches_transformers():
    hc = ref.DeepseekV4HyperConnection(HF_CONFIG)
    with torch.no_grad():
        hc.fn.copy_(randn(*hc.fn.shape) * 0.05)
        hc.base.copy_(randn(*hc.base.shape))
        hc.scale.copy_(torch.rand(3, generator=g) + 0.5)
    streams = randn(7, 4, 64)
    post, comb, collapsed = hc(streams.unsqueeze(0))
    ours = HyperConnection(hc.fn.data, hc.base.data, hc.scale.data, 4, CONFIG.hc_sinkhorn_iters, CONFIG.hc_eps,
                           CONFIG.rms_norm_eps)
    c, p, m = ours.collapse(streams)
    assert torch.allclose(c, collapsed[0], atol=1e-5)
    assert torch.allclose(p, post[0], atol=1e-6) and torch.allclose(m, comb[0], atol=1e-6)
    assert torch.allclose(m.sum(-1), torch.ones(7, 4), atol=1e-3)  # Sinkhorn: doubly stochastic
    assert torch.allclose(m.sum(-2), torch.ones(7, 4), atol=1e-3)

    head = ref.DeepseekV4HyperHead(HF_CONFIG)
    with torch.no_grad():
        head.hc_fn.copy_(randn(*head.hc_fn.shape) * 0.05)
        head.hc_base.copy_(randn(4))
        head.hc_scale.fill_(0.7)
    ours_head = HyperHead(head.hc_fn.data, head.hc_base.data, head.hc_scale.data, CONFIG.hc_eps, CONFIG.rms_norm_eps)
    assert torch.allclose(ours_head(streams), head(streams.unsqueeze(0))[0], atol=1e-5)


def test_routers_match_transformers():
    x = randn(9, 64)
    topk = ref.DeepseekV4TopKRouter(HF_CONFIG)
    with torch.no_grad():
        topk.weight.copy_(randn(8, 64))
        topk.e_score_correction_bias.copy_(randn(8))
    _, w_ref, i_ref = topk(x)
    w, i = Router(topk.weight.data, topk.e_score_correction_bias, None, 2, "sqrtsoftplus", 1.5)(x, None)
    order, order_ref = i.sort(-1), i_ref.sort(-1)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6)

    hashed = ref.DeepseekV4HashRouter(HF_CONFIG)
    with torch.no_grad():
        hashed.weight.copy_(randn(8, 64))
        hashed.tid2eid.copy_(torch.randint(0, 8, (CONFIG.vocab_size, 2), generator=g))
    ids = torch.randint(0, CONFIG.vocab_size, (9,), generator=g)
    _, w_ref, i_ref = hashed(x, ids)
    w, i = Router(hashed.weight.data, None, hashed.tid2eid, 2, "sqrtsoftplus", 1.5)(x, ids)
    order, order_ref = i.sort(dim=-1, stable=True), i_ref.sort(dim=-1, stable=True)  # (compiled routing sorts by id)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6)


def test_hca_compressor_streams_like_one_pass():
    """Feeding tokens in uneven chunks emits the same entries as one call (the pending window is kept)."""
    ratio, dim = 128, 32
    comp = Compressor(
        wkv=Dense(randn(dim, 64) * 0.1), wgate=Dense(randn(dim, 64) * 0.1), ape=randn(ratio, dim),
        norm=torch.ones(dim), ratio=ratio, dim=dim, eps=1e-6,
        rotary=Rotary.make(8, 160000.0, CONFIG.yarn),
    )
    x = randn(400, 64)
    whole = comp(x, CompressorState())
    state = CompressorState()
    for a, b in [(0, 5), (5, 130), (130, 131), (131, 400)]:
        parts = comp(x[a:b], state)
    assert whole.shape == (3, dim) and torch.allclose(parts, whole, atol=1e-6)
    assert state.buffer_kv.shape[0] == 400 - 3 * ratio


def test_stable_topk_is_a_stable_sorts_first_k():
    from ds4py.model.indexer import stable_topk

    values = randn(6, 300)
    values[:, ::3] = 0.0   # the indexer's common tie: every head's relu is 0
    values[:, 1::7] = -0.0  # an equal float that orders below 0.0 bit-wise
    values[:, -9:] = float("-inf")  # masked entries tie too
    values[0] = 0.0
    for k in (1, 5, 100, 300):
        expected = values.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(stable_topk(values, k), expected)
