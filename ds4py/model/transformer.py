"""The whole V4 network, built from a WeightSource: embedding -> blocks -> hyper-connection head ->
norm -> output head. `forward` runs a chunk of tokens of one sequence through its Cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ds4py.cache import Cache
from ds4py.config import ModelConfig
from ds4py.formats import BF16Matrix, Dense, Weight, stays_bf16
from ds4py.loaders import WeightSource
from ds4py.loaders.names import expected_shapes
from ds4py.memory.expert_cache import ExpertCache, StreamedExperts
from ds4py.model.attention import Attention
from ds4py.model.block import Block
from ds4py.model.compressor import Compressor
from ds4py.model.hyper_connection import HyperConnection, HyperHead
from ds4py.model.indexer import Indexer
from ds4py.model.moe import MoE, Router
from ds4py.model.norms import rms_norm
from ds4py.model.rope import Rotary


@dataclass
class Transformer:
    config: ModelConfig
    embed: torch.Tensor  # [vocab, D]; BF16 as stored (rows are converted once gathered), else the compute dtype
    blocks: list[Block]
    hc_head: HyperHead
    norm: torch.Tensor
    head: Weight         # [vocab, D]
    dtype: torch.dtype
    device: torch.device
    mtp: dict[str, Weight] = field(default_factory=dict)  # loaded, not used yet

    def new_cache(self) -> Cache:
        return Cache.empty(self.config.compress_ratios[: self.config.num_hidden_layers])

    def forward(self, token_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """token_ids [T] following the cache's tokens -> final hidden states [T, D]."""
        start = cache.length
        positions = torch.arange(start, start + token_ids.shape[0], device=self.device)
        token_ids = token_ids.to(self.device)
        streams = self.streams(token_ids)
        for block, layer_cache in zip(self.blocks, cache.layers):
            streams = block(streams, positions, token_ids, layer_cache)
        cache.tokens.extend(token_ids.tolist())
        return self.final_hidden(streams)

    def decode_batch(self, token_ids: torch.Tensor, caches: list[Cache]) -> torch.Tensor:
        """One next token for each of B sequences (token_ids [B], one cache each) -> hidden [B, D]."""
        positions = torch.tensor([c.length for c in caches], device=self.device)
        token_ids = token_ids.to(self.device)
        streams = self.streams(token_ids)
        for layer, block in enumerate(self.blocks):
            streams = block.decode_batch(streams, positions, token_ids, [c.layers[layer] for c in caches])
        for c, t in zip(caches, token_ids.tolist()):
            c.tokens.append(t)
        return self.final_hidden(streams)

    def streams(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> the embeddings copied into hc_mult residual streams [T, hc, D]."""
        x = self.embed[token_ids].to(self.dtype)
        return x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """[T, hc, D] -> the hc head's collapse, normed: [T, D]."""
        return rms_norm(self.hc_head(streams), self.norm, self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.linear(hidden).float()


def build_transformer(
    source: WeightSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    progress=None, expert_cache: ExpertCache | None = None,
) -> Transformer:
    """Read every weight of `source` and assemble the network. `progress(name)` is called per tensor.
    With `expert_cache`, routed experts are not read now but streamed through the cache."""
    c = source.config
    device = torch.device(device)
    shapes = expected_shapes(c)

    def weight(name: str) -> Weight:
        if progress:
            progress(name)
        if expert_cache is not None and name in source.expert_readers:
            return StreamedExperts(name, shapes[name], source.expert_readers[name], expert_cache,
                                   0, "streamed", device)
        w = source.get(name)
        if isinstance(w, Dense) and w.tensor.is_floating_point():
            if stays_bf16(name, w.shape, w.tensor.dtype):  # large BF16 matrices (head, ...): kernel / tiles
                return BF16Matrix(w.tensor.to(device))
            return Dense(w.tensor.to(device=device, dtype=dtype))
        return w.to(device)

    def f32(name: str) -> torch.Tensor:
        if progress:
            progress(name)
        return source.get(name).dequantize(torch.float32).to(device)

    main_rotary = Rotary.make(c.qk_rope_head_dim, c.rope_theta, None, device)
    compress_rotary = Rotary.make(c.qk_rope_head_dim, c.compress_rope_theta, c.yarn, device)

    def compressor(prefix: str, ratio: int, dim: int) -> Compressor:
        return Compressor(
            wkv=weight(prefix + "wkv.weight"), wgate=weight(prefix + "wgate.weight"),
            ape=f32(prefix + "ape"), norm=f32(prefix + "norm.weight"),
            ratio=ratio, dim=dim, eps=c.rms_norm_eps, rotary=compress_rotary,
        )

    def hyper(prefix: str) -> HyperConnection:
        return HyperConnection(
            fn=f32(prefix + "_fn"), base=f32(prefix + "_base"), scale=f32(prefix + "_scale"),
            hc=c.hc_mult, sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps,
        )

    def block(p: str, layer: int) -> Block:
        ratio = c.compress_ratios[layer]
        attn = Attention(
            wq_a=weight(p + "attn.wq_a.weight"), q_norm=f32(p + "attn.q_norm.weight"),
            wq_b=weight(p + "attn.wq_b.weight"), wkv=weight(p + "attn.wkv.weight"),
            kv_norm=f32(p + "attn.kv_norm.weight"), wo_a=weight(p + "attn.wo_a.weight"),
            wo_b=weight(p + "attn.wo_b.weight"), sinks=f32(p + "attn.attn_sink"),
            n_heads=c.num_attention_heads, head_dim=c.head_dim, o_groups=c.o_groups,
            window=c.sliding_window, eps=c.rms_norm_eps,
            rotary=compress_rotary if ratio else main_rotary,
        )
        if ratio:
            attn.compressor = compressor(p + "attn.compressor.", ratio, c.head_dim)
        if ratio == 4:
            attn.indexer = Indexer(
                wq_b=weight(p + "attn.indexer.wq_b.weight"),
                weights_proj=weight(p + "attn.indexer.weights_proj.weight"),
                compressor=compressor(p + "attn.indexer.compressor.", ratio, c.index_head_dim),
                n_heads=c.index_n_heads, head_dim=c.index_head_dim, topk=c.index_topk, rotary=compress_rotary,
            )
        hashed = layer < c.num_hash_layers
        router = Router(
            weight=f32(p + "ffn.gate.weight"),
            bias=None if hashed else f32(p + "ffn.gate.bias"),
            tid2eid=source.get(p + "ffn.gate.tid2eid").dequantize(torch.int64).to(device) if hashed else None,
            top_k=c.num_experts_per_tok, score_func=c.scoring_func, scaling=c.routed_scaling_factor,
        )
        shared = None
        if c.n_shared_experts:
            shared = tuple(weight(f"{p}ffn.shared_experts.w{i}.weight") for i in (1, 2, 3))
        ffn = MoE(
            router=router, w1=weight(p + "ffn.experts.w1"), w2=weight(p + "ffn.experts.w2"),
            w3=weight(p + "ffn.experts.w3"), shared=shared, swiglu_limit=c.swiglu_limit,
        )
        return Block(
            attn_norm=f32(p + "attn_norm.weight"), ffn_norm=f32(p + "ffn_norm.weight"),
            hc_attn=hyper(p + "hc_attn"), hc_ffn=hyper(p + "hc_ffn"), attn=attn, ffn=ffn, eps=c.rms_norm_eps,
        )

    def embedding() -> torch.Tensor:
        e = source.get("embed.weight")
        if isinstance(e, Dense) and stays_bf16("embed.weight", e.shape, e.tensor.dtype):
            return e.tensor.to(device)
        return e.dequantize(dtype).to(device)

    blocks = [block(f"layers.{i}.", i) for i in range(c.num_hidden_layers)]
    mtp = {name: weight(name) for name in source.names() if name.startswith("mtp.")}
    return Transformer(
        config=c,
        embed=embedding(),
        blocks=blocks,
        hc_head=HyperHead(
            fn=f32("hc_head_fn"), base=f32("hc_head_base"), scale=f32("hc_head_scale"),
            hc_eps=c.hc_eps, norm_eps=c.rms_norm_eps,
        ),
        norm=f32("norm.weight"),
        head=weight("head.weight"),
        dtype=dtype,
        device=device,
        mtp=mtp,
    )
