"""The whole V4 network, built from a WeightSource: embedding -> blocks -> hyper-connection head ->
norm -> output head. `forward` runs a chunk of tokens of one sequence through its Cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from functools import partial

import torch

from ds4py.cache import Cache, LayerCache
from ds4py.config import ModelConfig
from ds4py.formats import BF16Matrix, Dense, Weight, kernels, stays_bf16
from ds4py.formats.ggml import MXFP4Rows16
from ds4py.loaders import WeightSource
from ds4py.loaders.names import expected_shapes
from ds4py.memory.expert_cache import ExpertCache, StreamedExperts
from ds4py.memory.layer_stream import StreamedBlocks
from ds4py.memory.read_ahead import ReadAhead
from ds4py.model.attention import Attention
from ds4py.model.block import Block, complete
from ds4py.model.compressor import Compressor
from ds4py.model.hyper_connection import HyperConnection, HyperHead
from ds4py.model.indexer import Indexer
from ds4py.model.moe import MoE, Router
from ds4py.model.mtp import MTPBlock
from ds4py.model.rope import Rotary


@dataclass
class Transformer:
    config: ModelConfig
    embed: torch.Tensor  # [vocab, D]; BF16 as stored (rows are converted once gathered), else the compute dtype
    blocks: list[Block] | StreamedBlocks  # indexed per use: a streamed block is dropped when the call returns
    hc_head: HyperHead
    norm: torch.Tensor
    head: Weight         # [vocab, D]
    dtype: torch.dtype
    device: torch.device
    mtp: MTPBlock | StreamedMTP | None = None  # the multi-token-prediction block, for speculative decoding
    read_ahead: ReadAhead | None = None  # streaming: reads the next layer's likely experts in the background

    def new_cache(self) -> Cache:
        return Cache.empty(self.config.compress_ratios[: self.config.num_hidden_layers])

    def new_mtp_cache(self) -> LayerCache:
        """The MTP block's cache (its layer's compress ratio, `compress_ratios[num_hidden_layers]`)."""
        c = self.config
        return Cache.empty([c.compress_ratios[c.num_hidden_layers]]).layers[0]

    def forward(self, token_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """token_ids [T] following the cache's tokens -> final hidden states [T, D]."""
        return self.final_hidden(self.forward_streams(token_ids, cache))

    def forward_streams(self, token_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """`forward` before the hc head: the residual streams [T, hc, D] after the last block (the MTP block's
        input)."""
        start = cache.length
        positions = torch.arange(start, start + token_ids.shape[0], device=self.device)
        tokens, token_ids = token_ids.tolist(), token_ids.to(self.device)  # (the list from the host's copy)
        if self.read_ahead is not None:
            self.read_ahead.start(token_ids)
        streams, pending = self.streams(token_ids), None
        for layer, layer_cache in enumerate(cache.layers):
            streams, pending = self.blocks[layer](streams, positions, token_ids, layer_cache, pending)
        cache.tokens.extend(tokens)
        cache.last_call = len(tokens)
        return complete(streams, pending)

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, start: int, cache: LayerCache) -> torch.Tensor:
        """The MTP block over main streams [T, hc, D] at positions start .. start + T - 1 and the ids [T] of the
        tokens after them -> its normed hidden states [T, D] (`logits` gives its guesses at the tokens after
        those)."""
        positions = torch.arange(start, start + next_ids.shape[0], device=self.device)
        next_ids = next_ids.to(self.device)
        return self.mtp(streams, self.embed[next_ids], next_ids, positions, cache)

    def decode_batch(self, token_ids: torch.Tensor, caches: list[Cache]) -> torch.Tensor:
        """One next token for each of B sequences (token_ids [B], one cache each) -> hidden [B, D]."""
        positions = torch.tensor([c.length for c in caches], device=self.device)
        tokens, token_ids = token_ids.tolist(), token_ids.to(self.device)
        if self.read_ahead is not None:
            self.read_ahead.start(token_ids)
        streams, pending = self.streams(token_ids), None
        for layer in range(len(self.blocks)):
            streams, pending = self.blocks[layer].decode_batch(streams, positions, token_ids,
                                                               [c.layers[layer] for c in caches], pending)
        for c, t in zip(caches, tokens):
            c.tokens.append(t)
            c.last_call = 1
        return self.final_hidden(complete(streams, pending))

    def streams(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> the embeddings copied into hc_mult residual streams [T, hc, D]."""
        if token_ids.shape[0] == 1:  # decoding: the row converted as it is copied into each stream
            streams = torch.empty(1, self.config.hc_mult, self.embed.shape[1], dtype=self.dtype, device=self.device)
            return streams.copy_(self.embed[token_ids])  # [1, D] broadcast over the streams
        x = self.embed[token_ids].to(self.dtype)
        return x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """[T, hc, D] -> the hc head's collapse, normed: [T, D]."""
        return self.hc_head.normed(streams, self.norm, self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.linear_f32(hidden)


@dataclass
class Reader:
    """Reads weights by canonical name as the model holds them: packed formats as stored, floats in the
    compute dtype (large BF16 matrices kept bf16), norms and hyper-connection parameters in float32,
    routed experts as `StreamedExperts` when there is an expert cache."""

    source: WeightSource
    read: Callable[[str], Weight]  # source.get, or source.read for layers that are dropped after use
    device: torch.device
    dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]  # expected_shapes(config)
    expert_cache: ExpertCache | None = None
    progress: Callable[[str], None] | None = None

    def weight(self, name: str) -> Weight:
        if self.progress:
            self.progress(name)
        if self.expert_cache is not None and name in self.source.expert_readers:
            read_expert = self.source.expert_readers[name]
            if self.repacks(name):  # each expert read into a buffer of its own: repacked there
                read_expert = partial(repacked_expert, read_expert)
            return StreamedExperts(name, self.shapes[name], read_expert, self.expert_cache, 0, "streamed",
                                   self.device)
        if self.repacks(name):
            # a resident stack: read into memory of its own (pread, not the memory map) and repacked there (the
            # 3-layer flash-slice's 9.4 GB took 2.2 s to repack, after 3 s of reading from the page cache, or
            # 21 s from this machine's disk)
            return MXFP4Rows16.repack(self.source.read(name), in_place=True)
        w = self.read(name)
        if isinstance(w, Dense) and w.tensor.is_floating_point():
            if stays_bf16(name, w.shape, w.tensor.dtype):  # large BF16 matrices (head, ...): kernel / tiles
                return BF16Matrix(w.tensor.to(self.device))
            return Dense(w.tensor.to(device=self.device, dtype=self.dtype))
        return w.to(self.device)

    def repacks(self, name: str) -> bool:
        """Whether the expert stack `name` is repacked for the kernels (`MXFP4Rows16`, ~2.5x faster per token):
        a GGUF's MXFP4 experts on the CPU, the kernels built, DS4PY_REPACK not 0. Resident stacks are repacked at
        load, streamed experts as each is read (0.7 ms per 4.45 MB V4 Flash matrix), so that every memory mode
        computes the same products in the same order: the answer never depends on the memory budget."""
        return (self.device.type == "cpu" and self.source.metadata.get("tensor_kinds", {}).get(name) == "mxfp4"
                and ".ffn.experts." in name and os.environ.get("DS4PY_REPACK", "1") != "0" and kernels.available())

    def f32(self, name: str) -> torch.Tensor:
        if self.progress:
            self.progress(name)
        return self.read(name).dequantize(torch.float32).to(self.device)

    def int64(self, name: str) -> torch.Tensor:
        if self.progress:
            self.progress(name)
        return self.read(name).dequantize(torch.int64).to(self.device)


def repacked_expert(read_expert: Callable[[int], Weight], e: int) -> Weight:
    return MXFP4Rows16.repack(read_expert(e), in_place=True)


@dataclass
class Rotaries:
    main: Rotary      # sliding-window-only layers
    compress: Rotary  # layers with a compressor, and the compressors themselves

    @classmethod
    def make(cls, c: ModelConfig, device: torch.device) -> Rotaries:
        return cls(Rotary.make(c.qk_rope_head_dim, c.rope_theta, None, device),
                   Rotary.make(c.qk_rope_head_dim, c.compress_rope_theta, c.yarn, device))


def build_compressor(c: ModelConfig, r: Reader, prefix: str, ratio: int, dim: int, rotary: Rotary) -> Compressor:
    return Compressor(
        wkv=r.weight(prefix + "wkv.weight"), wgate=r.weight(prefix + "wgate.weight"),
        ape=r.f32(prefix + "ape"), norm=r.f32(prefix + "norm.weight"),
        ratio=ratio, dim=dim, eps=c.rms_norm_eps, rotary=rotary,
    )


def build_hyper(c: ModelConfig, r: Reader, prefix: str) -> HyperConnection:
    return HyperConnection(
        fn=r.f32(prefix + "_fn"), base=r.f32(prefix + "_base"), scale=r.f32(prefix + "_scale"),
        hc=c.hc_mult, sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps,
    )


def build_block(c: ModelConfig, r: Reader, layer: int, rotaries: Rotaries, prefix: str | None = None) -> Block:
    """Layer `layer`'s block, its weights named `prefix` + ... (default `layers.{layer}.`; the MTP block's are
    `mtp.{j}.` at layer num_hidden_layers + j)."""
    p = prefix if prefix is not None else f"layers.{layer}."
    ratio = c.compress_ratios[layer]
    attn = Attention(
        wq_a=r.weight(p + "attn.wq_a.weight"), q_norm=r.f32(p + "attn.q_norm.weight"),
        wq_b=r.weight(p + "attn.wq_b.weight"), wkv=r.weight(p + "attn.wkv.weight"),
        kv_norm=r.f32(p + "attn.kv_norm.weight"), wo_a=r.weight(p + "attn.wo_a.weight"),
        wo_b=r.weight(p + "attn.wo_b.weight"), sinks=r.f32(p + "attn.attn_sink"),
        n_heads=c.num_attention_heads, head_dim=c.head_dim, o_groups=c.o_groups,
        window=c.sliding_window, eps=c.rms_norm_eps,
        rotary=rotaries.compress if ratio else rotaries.main,
    )
    if ratio:
        attn.compressor = build_compressor(c, r, p + "attn.compressor.", ratio, c.head_dim, rotaries.compress)
    if ratio == 4:
        attn.indexer = Indexer(
            wq_b=r.weight(p + "attn.indexer.wq_b.weight"),
            weights_proj=r.weight(p + "attn.indexer.weights_proj.weight"),
            compressor=build_compressor(c, r, p + "attn.indexer.compressor.", ratio, c.index_head_dim,
                                        rotaries.compress),
            n_heads=c.index_n_heads, head_dim=c.index_head_dim, topk=c.index_topk, rotary=rotaries.compress,
        )
    hashed = layer < c.num_hash_layers
    router = Router(
        weight=r.f32(p + "ffn.gate.weight"),
        bias=None if hashed else r.f32(p + "ffn.gate.bias"),
        tid2eid=r.int64(p + "ffn.gate.tid2eid") if hashed else None,
        top_k=c.num_experts_per_tok, score_func=c.scoring_func, scaling=c.routed_scaling_factor,
    )
    shared = None
    if c.n_shared_experts:
        shared = tuple(r.weight(f"{p}ffn.shared_experts.w{i}.weight") for i in (1, 2, 3))
    ffn = MoE(
        router=router, w1=r.weight(p + "ffn.experts.w1"), w2=r.weight(p + "ffn.experts.w2"),
        w3=r.weight(p + "ffn.experts.w3"), shared=shared, swiglu_limit=c.swiglu_limit,
    )
    return Block(
        attn_norm=r.f32(p + "attn_norm.weight"), ffn_norm=r.f32(p + "ffn_norm.weight"),
        hc_attn=build_hyper(c, r, p + "hc_attn"), hc_ffn=build_hyper(c, r, p + "hc_ffn"), attn=attn, ffn=ffn,
        eps=c.rms_norm_eps,
    )


def build_mtp(c: ModelConfig, r: Reader, rotaries: Rotaries) -> MTPBlock:
    """The first MTP block (`mtp.0.`; V4 Flash has one), at layer num_hidden_layers."""
    p = "mtp.0."
    return MTPBlock(
        block=build_block(c, r, c.num_hidden_layers, rotaries, p),
        e_proj=r.weight(p + "e_proj.weight"), h_proj=r.weight(p + "h_proj.weight"),
        enorm=r.f32(p + "enorm.weight"), hnorm=r.f32(p + "hnorm.weight"), norm=r.f32(p + "norm.weight"),
        hc_head=HyperHead(fn=r.f32(p + "hc_head_fn"), base=r.f32(p + "hc_head_base"),
                          scale=r.f32(p + "hc_head_scale"), hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps),
        eps=c.rms_norm_eps,
    )


@dataclass
class StreamedMTP:
    """The MTP block under stream-layers: built from the file each time it runs and dropped after, as a streamed
    layer is (it is a sliding-window block, no larger than the largest layer the plan leaves room for)."""

    build: Callable[[], MTPBlock]

    def __call__(self, *args) -> torch.Tensor:
        return self.build()(*args)


def build_transformer(
    source: WeightSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    progress=None, expert_cache: ExpertCache | None = None, keep_layers: Collection[int] | None = None,
    read_ahead: str | None = None,
) -> Transformer:
    """Read every weight of `source` and assemble the network. `progress(name)` is called per tensor.
    With `expert_cache`, routed experts are not read now but streamed through the cache. With
    `keep_layers` (the stream-layers memory mode), only those layers are built now; the others are
    built from the source each time they run and dropped after (`StreamedBlocks`), the MTP block
    likewise (`StreamedMTP`). With `read_ahead` (a `ds4py.memory.read_ahead` predictor)
    and an expert cache, the next layer's likely experts are read into the cache in the background."""
    c = source.config
    device = torch.device(device)
    r = Reader(source, source.get, device, dtype, expected_shapes(c), expert_cache, progress)
    rotaries = Rotaries.make(c, device)
    ahead = None
    if read_ahead and expert_cache is not None:
        quiet = replace(r, progress=None)
        stacks = [tuple(quiet.weight(f"layers.{i}.ffn.experts.{w}") for w in ("w1", "w3", "w2"))
                  for i in range(c.num_hidden_layers)]
        ahead = ReadAhead(expert_cache, stacks, read_ahead)

    def hooked(block: Block, layer: int, held: bool) -> Block:
        """Tell the read-ahead when the block routes; `held` blocks lend it their router."""
        if ahead is not None:
            block.ffn.read_ahead = partial(ahead.routed, layer)
            if held:
                ahead.routers[layer] = block.ffn.router
        return block

    has_mtp = "mtp.0.e_proj.weight" in source.loaders and c.num_hidden_layers < len(c.compress_ratios)
    if keep_layers is None:
        blocks = [hooked(build_block(c, r, i, rotaries), i, True) for i in range(c.num_hidden_layers)]
        mtp = build_mtp(c, r, rotaries) if has_mtp else None
    else:
        def build(layer: int, read: Callable[[str], Weight]) -> Block:
            block = build_block(c, replace(r, read=read, progress=None), layer, rotaries)
            return hooked(block, layer, layer in keep_layers)

        blocks = StreamedBlocks(c.num_hidden_layers, build, source.read, keep_layers)
        mtp = None
        if has_mtp:
            mtp = StreamedMTP(lambda: build_mtp(c, replace(r, read=blocks.counted, progress=None), rotaries))

    def embedding() -> torch.Tensor:
        e = source.get("embed.weight")
        if isinstance(e, Dense) and stays_bf16("embed.weight", e.shape, e.tensor.dtype):
            return e.tensor.to(device)
        return e.dequantize(dtype).to(device)

    return Transformer(
        config=c,
        embed=embedding(),
        blocks=blocks,
        hc_head=HyperHead(
            fn=r.f32("hc_head_fn"), base=r.f32("hc_head_base"), scale=r.f32("hc_head_scale"),
            hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps,
        ),
        norm=r.f32("norm.weight"),
        head=r.weight("head.weight"),
        dtype=dtype,
        device=device,
        mtp=mtp,
        read_ahead=ahead,
    )
