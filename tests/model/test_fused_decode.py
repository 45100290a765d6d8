"""Decoding's compiled paths (the one-token MoE call, the hyper-connection collapse/expand) give the logits the
torch ops give, on a GGUF model whose experts are MXFP4 and shared experts Q8_0, in float32."""

from __future__ import annotations

import pytest
import torch

import ds4py
from ds4py.formats import kernels, small_gemm
from ds4py.model import block as block_module
from ds4py.model import hc_kernel, hyper_connection
from ds4py.model.moe import MoE
from ds4py.synthetic import make_model


def one_by_one(monkeypatch) -> None:
    """Decode each block through its calls one by one, not `block_kernel.block_one` (which makes them from C)."""
    monkeypatch.setattr(block_module, "block_one", lambda *a: None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if not kernels.available():
        pytest.skip("CPU kernels could not be built here")
    path = tmp_path_factory.mktemp("fused") / "t.gguf"
    make_model(str(path), preset="tiny", seed=4)
    return ds4py.load(str(path))


def test_fused_moe_equals_the_expert_loop(model, monkeypatch):
    """Each decode step from the same cache, once with the fused call and once with the loop."""
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    calls = []
    one_by_one(monkeypatch)  # (the whole block's call makes the MoE's without Python)
    real_kernel, real_chain = kernels.moe_one, block_module.ffn_one  # the MoE call, alone or after the block's others
    monkeypatch.setattr(kernels, "moe_one", lambda *a: calls.append(1) or real_kernel(*a))
    monkeypatch.setattr(block_module, "ffn_one", lambda *a: calls.append(1) or real_chain(*a))

    def loop(ids, cache):
        with monkeypatch.context() as m:
            m.setattr(MoE, "whole_one", lambda self, x, token_ids: None)
            m.setattr(MoE, "fused_one", lambda self, x, w, ids: None)
            m.setattr(block_module, "ffn_one", lambda *a: None)
            return model.prefill(ids, cache)

    cache = model.new_cache()
    steps = paired_steps(model.prefill, loop, cache, model.prefill(prompt, cache), 12)
    assert len(calls) == 12 * model.config.num_hidden_layers  # every layer of every decoded token
    # Equal to float rounding unless an activation lands on a Q8_0 rounding boundary on one side only
    # (swiglu's exp differs from torch's in the last bit), which moves that step's logits by a quantization
    # step (<1% of the largest logit); a wrong expert, weight or order would move every step by far more.
    assert sum(r < 1e-5 for r in steps) >= 9, steps
    assert max(steps) < 2e-2, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_whole_moe_call_equals_router_then_experts(model, monkeypatch, dtype):
    """A decode token's MoE in one call (router, routing and experts: `kernels.moe_one`) against the router's call
    then the experts' call, on every layer (hash-routed and routed): the same products in the same order, so the
    same bits; and the routing the same experts and weights as torch's ops on the same logits."""
    gen = torch.Generator().manual_seed(12)
    for block in model.transformer.blocks:
        moe = block.ffn
        for _ in range(4):
            x = torch.randn(1, model.config.hidden_size, generator=gen).to(dtype)
            token_ids = torch.randint(0, model.config.vocab_size, (1,), generator=gen)
            whole = moe.whole_one(x, token_ids)
            weights, ids = moe.router(x, token_ids)
            assert whole is not None and whole.dtype == dtype
            assert torch.equal(whole, moe.fused_one(x, weights, ids))
            with monkeypatch.context() as m:
                m.setattr(kernels, "route", lambda *a: None)  # torch's ops
                torch_weights, torch_ids = moe.router(x, token_ids)
            order = torch_ids.argsort(dim=-1)
            assert torch.equal(ids, torch_ids.gather(1, order))
            torch.testing.assert_close(weights, torch_weights.gather(1, order), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_projections_in_one_call_equal_the_calls_one_by_one(model, monkeypatch, dtype):
    """A decode token's attention projections, norms and rotation in one compiled call (`kernels.project_one`)
    against Attention.project's calls one by one, on every layer: the same operations, so the same bits."""
    from ds4py.model.attention import Attention

    gen = torch.Generator().manual_seed(15)
    for block in model.transformer.blocks:
        attn = block.attn
        x = torch.randn(1, model.config.hidden_size, generator=gen).to(dtype)
        positions = torch.tensor([int(torch.randint(0, 4000, (1,), generator=gen))])
        assert attn.project_one(x, attn.rotary.rotation(positions)) is not None
        fused = attn.project(x, positions)
        with monkeypatch.context() as m:
            m.setattr(Attention, "project_one", lambda self, x, rot: None)
            calls = attn.project(x, positions)
        for a, b in zip(fused[:3], calls[:3]):
            assert a.dtype == dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_output_projection_in_one_call_equals_the_two_calls(model, dtype):
    """A decode token's grouped wo_a and wo_b in one compiled call (`kernels.output_one`) against the two calls
    Attention.output makes otherwise, on every layer: the same bits."""
    gen = torch.Generator().manual_seed(16)
    for block in model.transformer.blocks:
        attn = block.attn
        out = torch.randn(1, attn.n_heads, attn.head_dim, generator=gen).to(dtype)
        plan = kernels.output_plan(attn.wo_a.kernel_rows(), attn.wo_b.kernel_rows(), attn.o_groups,
                                   attn.n_heads * attn.head_dim)
        fused = kernels.output_one(plan, out)
        assert fused is not None and torch.equal(attn.output(out), fused)
        assert torch.equal(fused, attn.wo_b.linear(attn.grouped_wo_a(out)))


def test_fused_hyper_connections_equal_torch(model, monkeypatch):
    """Each decode step from the same cache, with the compiled hyper-connections and with torch's."""
    prompt = list(range(3, 140))  # past a ratio-128 block

    def torch_ops(ids, cache):
        with monkeypatch.context() as m:
            m.setattr(hc_kernel, "COMPILED_COLLAPSE", False)
            m.setattr(hyper_connection, "hc_expand", lambda *a: None)  # expand is compiled at any T
            m.setattr(block_module, "ffn_one", lambda *a: None)  # (which expands and collapses in C too)
            one_by_one(m)  # (as does the whole block's call)
            return model.prefill(ids, cache)

    cache = model.new_cache()
    steps = paired_steps(model.prefill, torch_ops, cache, model.prefill(prompt, cache), 8)
    # equal to float rounding but where an activation lands on a Q8_0 rounding boundary on one side only (see
    # test_fused_moe_equals_the_expert_loop); a wrong weight or mixing would move every step far more
    assert sum(r < 1e-4 for r in steps) >= 6 and max(steps) < 2e-2, steps


def test_repacked_experts_equal_the_file_layout(model, tmp_path, monkeypatch):
    """Resident GGUF MXFP4 experts are repacked at load (MXFP4Rows16); DS4PY_REPACK=0 keeps the file's layout.
    Each decode step from the same cache gives the same logits up to float rounding, and prefill too."""
    from ds4py.formats.ggml import GGMLWeight, MXFP4Rows16

    monkeypatch.setenv("DS4PY_REPACK", "0")
    plain = ds4py.load(str(model.source.path))
    assert isinstance(model.transformer.blocks[1].ffn.w1, MXFP4Rows16)
    assert isinstance(plain.transformer.blocks[1].ffn.w1, GGMLWeight)
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    # prefill: T rows at once through both kernels. Their float sums differ in order, so a later layer's input
    # can land on a Q8_0 activation rounding boundary on one side only: one quantization step in that activation,
    # carried on by every later token's attention (the bound of the decode steps below, for the same reason)
    repacked, plain_logits = model.logits(prompt), plain.logits(prompt)
    assert rel(repacked, plain_logits) < 2e-2
    assert (repacked.argmax(-1) == plain_logits.argmax(-1)).float().mean() >= 0.9
    cache = plain.new_cache()
    steps = paired_steps(model.prefill, plain.prefill, cache, plain.prefill(prompt, cache), 10)
    assert sum(r < 1e-5 for r in steps) >= 8 and max(steps) < 2e-2, steps  # see test_fused_moe_equals_the_expert_loop


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def paired_steps(fast, plain, cache, logits: torch.Tensor, steps: int) -> list[float]:
    """`steps` decode steps from the same cache, each once through `fast(ids, cache)` (on a copy of the cache) and
    once through `plain`, which the sequence goes on with; both must pick the same next token. -> each step's
    largest difference relative to plain's largest logit."""
    out = []
    for _ in range(steps):
        token = int(logits.argmax())
        fast_logits = fast([token], cache.clone())
        logits = plain([token], cache)
        assert fast_logits.argmax() == logits.argmax()
        out.append(rel(fast_logits, logits))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fused_prefill_moe_equals_the_expert_loop(model, monkeypatch, dtype):
    """A prefill chunk's MoE in one compiled call against the loop over its experts, on every layer (hash-routed
    and routed), resident repacked experts and a Q8_0 shared expert: the same quantized products, so equal up to
    float32 rounding (bf16: the loop rounds after each op, the call once)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(37, model.config.hidden_size, generator=gen).to(dtype)
    token_ids = torch.randint(0, model.config.vocab_size, (37,), generator=gen)
    calls = []
    real = kernels.moe_many
    monkeypatch.setattr(kernels, "moe_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    for block in model.transformer.blocks:
        fused = block.ffn(x, token_ids)
        with monkeypatch.context() as m:  # the pairs grouped in Python, then experts_many: the same bits
            m.setattr(MoE, "current_plan", lambda self: None)
            assert torch.equal(block.ffn(x, token_ids), fused)
        with monkeypatch.context() as m:
            m.setattr(MoE, "fused_many", lambda self, x, w, ids: None)
            loop = block.ffn(x, token_ids)
        assert fused.dtype == dtype and fused.shape == x.shape
        if dtype == torch.float32:
            assert rel(fused, loop) < 1e-5
        else:  # against float32 on the same inputs: the call's one rounding is no further off than the loop's
            exact = block.ffn(x.float(), token_ids)
            assert rel(fused.float(), exact) < 1e-2 and rel(fused.float(), exact) <= rel(loop.float(), exact)
    assert len(calls) == len(model.transformer.blocks) * (1 if dtype == torch.float32 else 2)  # (+ float32 exact)


def test_long_bf16_chunk_moe_grouped_in_c_equals_grouped_in_python(model, monkeypatch):
    """A 300-token bf16 chunk (the shared expert then goes through the bf16 GEMM, the routed ones through
    moe_many): the same bits as the pairs grouped in Python and handed to experts_many."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(300, model.config.hidden_size, generator=gen).bfloat16()
    token_ids = torch.randint(0, model.config.vocab_size, (300,), generator=gen)
    for block in model.transformer.blocks:
        fused = block.ffn(x, token_ids)
        with monkeypatch.context() as m:
            m.setattr(MoE, "current_plan", lambda self: None)
            assert torch.equal(block.ffn(x, token_ids), fused)


def test_indexer_query_blocks_choose_the_same_entries(model, monkeypatch):
    """A long prompt's indexer scores go in blocks of queries (indexer.SCORE_BUDGET): the same entries chosen, the
    same logits up to the matmuls' rounding, whatever the block."""
    from ds4py.model import indexer

    chosen = []
    real = indexer.Indexer.__call__
    monkeypatch.setattr(indexer.Indexer, "__call__", lambda self, *a: chosen.append(real(self, *a)) or chosen[-1])
    prompt = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(13)).tolist()
    whole = model.logits(prompt)
    one_block, chosen[:] = list(chosen), []
    monkeypatch.setattr(indexer, "SCORE_BUDGET", 7 * model.config.index_n_heads * 64)  # blocks of a few rows
    blocked = model.logits(prompt)
    assert len(chosen) == len(one_block) > 0
    assert all(torch.equal(a, b) for a, b in zip(chosen, one_block))
    assert rel(blocked, whole) < 1e-5


def test_attention_query_blocks_equal_the_whole_chunk(model, monkeypatch):
    """A long prompt's attention goes in blocks of queries (attention.ATTENTION_BUDGET), each over its own window
    and compressed entries: the same logits up to the matmuls' rounding, whatever the block."""
    from ds4py.model import attention

    monkeypatch.setattr(attention, "attend_rows", lambda *a: None)  # torch's ops (small heads: one compiled call)
    prompt = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(14)).tolist()
    whole = model.logits(prompt)  # past a ratio-128 entry and many ratio-4 ones, 256-token chunks
    calls = []
    real = attention.Attention.attend_rows
    monkeypatch.setattr(attention.Attention, "attend_rows", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(attention, "ATTENTION_BUDGET", 1)  # blocks of 16 queries
    blocked = model.logits(prompt)
    assert len(calls) > 2 * model.config.num_hidden_layers  # several blocks per layer and chunk
    assert rel(blocked, whole) < 1e-5


def test_whole_chunk_expert_takes_the_gemm_only_when_its_matrices_are_large(model, monkeypatch):
    """A bf16 chunk where a routed expert has >= BF16_GEMM_MIN_T tokens: small experts (the tiny model's) stay in
    one call (`small_gemm.moe`, routed and shared); large ones (here: the threshold lowered) in ggml rows go through
    the per-expert bf16 GEMMs where the CPU has a native bf16 GEMM (here: said to have), in R16 stacks (the repacked
    default) stay in the one int8 call with the shared expert through its GEMM; without a native bf16 GEMM both
    stay in the one int8 call. (Without AMX: with it R16 experts of many tokens take their GEMMs, the next test.)"""
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    monkeypatch.setenv("DS4PY_AMX", "0")
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(900, model.config.hidden_size, generator=gen).bfloat16()
    token_ids = torch.randint(0, model.config.vocab_size, (900,), generator=gen)
    block = model.transformer.blocks[1]
    assert block.ffn.w1.stack_rows()[1] == kernels.MXFP4_R16
    weights, ids = block.ffn.router(x, token_ids)
    assert int(torch.bincount(ids.flatten()).max()) >= kernels.BF16_GEMM_MIN_T
    calls, ran = [], []
    real, real_many = small_gemm.moe, kernels.moe_many
    monkeypatch.setattr(small_gemm, "moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "moe_many", lambda *a, **k: ran.append(k.get("shared")) or real_many(*a, **k))
    grouped = block.ffn(x, token_ids)
    assert calls == [1] and ran == []
    monkeypatch.setattr(kernels, "BF16_GEMM_MIN_VALUES", 1)
    stayed = block.ffn(x, token_ids)
    assert calls == [1] and ran == [False]
    monkeypatch.setenv("DS4PY_REPACK", "0")
    plain = ds4py.load(str(model.source.path), dtype="bfloat16").transformer.blocks[1]
    assert plain.ffn.w1.stack_rows()[1] == kernels.MXFP4
    looped = plain.ffn(x, token_ids)
    assert calls == [1] and ran == [False]  # the routed loop (`MoE.routed`), each expert's bf16 GEMM
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    exact = block.ffn(x.float(), token_ids)  # (float32 through the int8 call: with the GEMM it would take that)
    # against float32 on the same inputs: the loop rounds to bf16 after each op (and its weights), the calls once
    assert rel(looped.float(), exact) < 3e-2 and rel(grouped.float(), exact) <= rel(looped.float(), exact)
    assert rel(stayed.float(), exact) < 3e-2
    int8 = block.ffn(x, token_ids)
    assert calls == [1] and ran == [False, True, True]  # (float32 `exact`, then this) routed and shared in one call
    assert rel(int8.float(), exact) < 3e-2


def test_hot_r16_experts_take_their_gemms_where_the_cpu_has_amx(model, monkeypatch):
    """A bf16 chunk with large experts (here: the threshold lowered) in R16 stacks where the CPU has AMX (here: said
    to have): the experts with R16_GEMM_MIN_T tokens or more through their matrices' bf16 GEMMs, the others in one
    int8 call (only they), the shared one through its GEMM; float32 sums of both, so within the int8 call's error
    of float32 on the same inputs. float32 chunks, and CPUs without AMX, keep the one int8 call."""
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    monkeypatch.setenv("DS4PY_AMX", "1")
    monkeypatch.setattr(kernels, "BF16_GEMM_MIN_VALUES", 1)
    gen = torch.Generator().manual_seed(29)
    block = model.transformer.blocks[1]
    assert block.ffn.w1.stack_rows()[1] == kernels.MXFP4_R16
    T = 64
    x = torch.randn(T, model.config.hidden_size, generator=gen).bfloat16()
    token_ids = torch.randint(0, model.config.vocab_size, (T,), generator=gen)
    _, ids = block.ffn.router(x, token_ids)
    counts = torch.bincount(ids.flatten())
    hot_t = kernels.R16_GEMM_MIN_T
    assert (counts >= hot_t).any() and ((counts > 0) & (counts < hot_t)).any()  # both kinds in this chunk
    many, gemms = [], []
    real_many, real_linear = kernels.experts_many, kernels.ggml_linear
    monkeypatch.setattr(kernels, "experts_many", lambda x, e, q, c, *a, **k: many.append(list(c))
                        or real_many(x, e, q, c, *a, **k))

    def linear(x, raw, qtype):
        if int(qtype) == kernels.MXFP4_R16:
            gemms.append(x.numel() // x.shape[-1])
        return real_linear(x, raw, qtype)

    monkeypatch.setattr(kernels, "ggml_linear", linear)
    split = block.ffn(x, token_ids)
    assert many == [[int(c) for c in counts if 0 < c < hot_t]]  # in ascending id
    assert sorted(gemms) == sorted(int(c) for c in counts if c >= hot_t for _ in range(3))
    assert all(g >= hot_t for g in gemms)
    f32 = block.ffn(x.float(), token_ids)  # float32: the one int8 call
    monkeypatch.setenv("DS4PY_AMX", "0")
    int8 = block.ffn(x, token_ids)
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    exact = block.ffn(x.float(), token_ids)  # float32 through the one int8 call, the shared expert's too
    assert len(gemms) == 3 * int((counts >= hot_t).sum())  # none since the split
    assert rel(f32, exact) < 1e-2 and rel(int8.float(), exact) < 3e-2
    assert rel(split.float(), exact) < 3e-2 and rel(split.float(), int8.float()) < 3e-2


def test_mid_length_chunk_of_large_experts_takes_the_shared_expert_through_the_gemm(model, monkeypatch):
    """A bf16 chunk of BF16_LINEAR_MIN_T..BF16_GEMM_MIN_T tokens with large experts (here: the threshold lowered) and
    a native bf16 GEMM (here: said to have): the routed experts in the one int8 call, the shared one through its
    matrices' bf16 GEMM, for float32 rows too (`kernels.gemm_prompt`); small experts keep the one int8 call for
    both. (Without AMX, where R16 experts of many tokens would leave the one call: the test above.)"""
    monkeypatch.setenv("DS4PY_BF16_GEMM", "1")
    monkeypatch.setenv("DS4PY_AMX", "0")
    gen = torch.Generator().manual_seed(23)
    T = (kernels.BF16_LINEAR_MIN_T + kernels.BF16_GEMM_MIN_T) // 2
    x = torch.randn(T, model.config.hidden_size, generator=gen).bfloat16()
    token_ids = torch.randint(0, model.config.vocab_size, (T,), generator=gen)
    block = model.transformer.blocks[1]
    ran = []
    real_many = kernels.moe_many
    monkeypatch.setattr(kernels, "moe_many", lambda *a, **k: ran.append(k.get("shared")) or real_many(*a, **k))
    small = block.ffn(x, token_ids)
    monkeypatch.setattr(kernels, "BF16_GEMM_MIN_VALUES", 1)
    large = block.ffn(x, token_ids)
    assert ran == [True, False]
    f32 = block.ffn(x.float(), token_ids)
    assert ran == [True, False, False] and f32.dtype == torch.float32
    monkeypatch.setenv("DS4PY_BF16_GEMM", "0")
    exact = block.ffn(x.float(), token_ids)  # float32 through the one int8 call
    assert ran == [True, False, False, True]
    assert rel(large.float(), exact) < 3e-2 and rel(small.float(), exact) < 3e-2 and rel(f32, exact) < 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compressor_and_indexer_one_token_calls_equal_the_plain_ones(model, monkeypatch, dtype):
    """Decoding runs each compressor's token in one step (its projections into the pending window in place, a
    closing window's entry) and the indexer's query in one call: the logits of the plain `linear` calls (float32:
    to summation order), across window closes of every compressor (ratio 4, 128 and the indexers'); a cloned cache
    then decodes on its own."""
    from ds4py.model.compressor import Compressor

    m = ds4py.load(str(model.source.path), dtype=dtype)
    prompt = list(range(1, 126))  # decoding then crosses a ratio-128 close (position 127) and many ratio-4 ones
    steps = torch.randint(0, m.config.vocab_size, (12,), generator=torch.Generator().manual_seed(23)).tolist()
    ran = []
    real = Compressor.step_one

    def step_one(self, x, state):
        entries = real(self, x, state)
        ran.append(entries is not None)
        return entries

    monkeypatch.setattr(Compressor, "step_one", step_one)
    one_by_one(monkeypatch)  # (the whole block's call makes the steps without Python)

    def decode():
        cache = m.new_cache()
        m.prefill(prompt, cache)
        out = [m.prefill([t], cache) for t in steps[:5]]
        fork = cache.clone()
        out += [m.prefill([t], cache) for t in steps[5:]]
        return torch.stack(out), torch.stack([m.prefill([t], fork) for t in steps[5:]])

    fast, forked = decode()
    assert ran and all(ran)
    monkeypatch.setattr(Compressor, "step_one", lambda self, x, state: None)
    monkeypatch.setattr(kernels, "index_query_one", lambda *a: None)
    plain, plain_forked = decode()
    assert torch.equal(forked, fast[5:]) and torch.equal(plain_forked, plain[5:])
    assert rel(fast, plain) < (1e-6 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_block_second_half_in_one_call_equals_the_calls(model, monkeypatch, dtype):
    """A decoding token's output projections, ffn collapse and MoE in one compiled call (`hc_kernel.ffn_one`, every
    layer: the hash-routed one too) against the three calls it chains: the same logits, bit for bit."""
    ran = []
    one_by_one(monkeypatch)
    real = block_module.ffn_one
    monkeypatch.setattr(block_module, "ffn_one", lambda *a: ran.append(1) or real(*a))
    m = ds4py.load(model.source.path, dtype=str(dtype).removeprefix("torch."))
    ids = list(range(3, 90))

    def decode():
        cache = m.new_cache()
        m.prefill(ids[:40], cache)
        return [m.prefill([t], cache) for t in ids[40:]]

    chained = decode()
    assert len(ran) == len(ids[40:]) * m.config.num_hidden_layers
    monkeypatch.setattr(block_module, "ffn_one", lambda *a: None)
    for want, got in zip(decode(), chained):
        assert torch.equal(want, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("prompt,large", [(1, False), (120, False), (120, True)], ids=["1", "120", "120-large"])
def test_whole_block_in_one_call_equals_the_calls(model, monkeypatch, dtype, prompt, large):
    """A decoding token through a whole block in one compiled call (`block_kernel.block_one`: every layer, the
    first (no pending ffn output) and the hash-routed one too) against the calls it makes one by one: the same
    logits and the same caches, bit for bit, across the window's moves (16 rows for a window of 8), ratio-4 closes
    with and without indexer entries and, after a prompt of 120, the ratio-128 close at position 127; a cache cloned
    mid-way decodes on its own the same. large: the attention as V4 Flash's 64 heads of 512 take it
    (`attend_heads`, forced here by MAX_WORK)."""
    if large:
        from ds4py.model import attention_kernel

        monkeypatch.setenv("DS4PY_BF16_GEMM", "0")  # (with a native bf16 GEMM large heads take torch's ops)
        monkeypatch.setattr(attention_kernel, "MAX_WORK", 1)
    ran = []
    real = block_module.block_one
    monkeypatch.setattr(block_module, "block_one", lambda *a: ran.append(r := real(*a)) or r)
    m = ds4py.load(model.source.path, dtype=str(dtype).removeprefix("torch."))
    ids = torch.randint(0, m.config.vocab_size, (prompt + 30,), generator=torch.Generator().manual_seed(5)).tolist()

    def decode():
        cache = m.new_cache()
        m.prefill(ids[:prompt], cache)
        out = [m.prefill([t], cache) for t in ids[prompt:prompt + 10]]
        fork = cache.clone()
        out += [m.prefill([t], cache) for t in ids[prompt + 10:]]
        return torch.stack(out), torch.stack([m.prefill([t], fork) for t in ids[prompt + 10:]]), cache

    one_call, forked, cache = decode()
    assert len(ran) == (50 + (prompt == 1)) * m.config.num_hidden_layers and all(r is not None for r in ran)
    one_by_one(monkeypatch)
    calls, calls_forked, want = decode()
    assert torch.equal(one_call, calls) and torch.equal(forked, calls_forked) and torch.equal(forked, calls[10:])
    for a, b in zip(cache.layers, want.layers):
        assert torch.equal(a.window, b.window)
        for s, t in ((a.compressor, b.compressor), (a.indexer, b.indexer)):
            if s is not None:
                assert s.n_entries == t.n_entries and (s.n_entries == 0 or torch.equal(s.entries, t.entries))
                assert torch.equal(s.buffer_kv, t.buffer_kv) and torch.equal(s.buffer_gate, t.buffer_gate)


def test_whole_block_call_is_made_again_when_a_weight_is_replaced(model):
    """The block's one-token plan points into its weights: replacing one (a new object) makes the plan again from
    the new one, and decoding goes on through it."""
    import copy

    m = ds4py.load(model.source.path)
    cache = m.new_cache()
    m.prefill(list(range(3, 20)), cache)
    m.prefill([7], cache)
    block = m.transformer.blocks[1]
    old = block.one_plan
    assert old is not None
    m.prefill([8], cache)
    assert block.one_plan is old  # the same weights: the same plan
    block.attn.wo_b = copy.copy(block.attn.wo_b)
    m.prefill([9], cache)
    assert block.one_plan is not None and block.one_plan is not old
    assert block.one_plan.made_from[1] is block.attn.output_plan()
