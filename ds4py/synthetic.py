"""`ds4py make-model`: synthetic random-weight models for tests and benchmarks.

`tiny` is `config.tiny_config()`. `flash-slice` has DeepSeek V4 Flash's real shapes (hidden 4096, 64
heads of 512, q_lora 1024, 8 output groups of 1024, 256 routed experts of 2048 with 6 active, one
shared expert, indexer 64 heads of 128, vocab 129280) but only a few layers. Weights are written in
the official layout (FP8 e4m3 with 128x128 UE8M0 scales, FP4 e2m1 experts with per-32 UE8M0
scales, BF16/F32 rest), shard by shard, generated directly in packed form so memory stays bounded by
one shard; `--format gguf` then converts that checkpoint with `ds4py convert`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ds4py.config import ModelConfig, tiny_config
from ds4py.errors import Ds4pyError
from ds4py.loaders.names import expected_shapes, storage
from ds4py.model.init import random_tensor

V4_VOCAB = 129280

REAL_PATTERN = [0, 0] + [4, 128] * 20 + [4]
# e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (codes 0..7, bit 3 the sign); a random byte indexes this
# table of codes so that values look roughly normal
FP4_CODE_CDF = torch.tensor([0.20, 0.50, 0.72, 0.85, 0.93, 0.975, 0.994, 1.0])
FP4_BYTE_TO_CODE = (
    torch.bucketize((torch.arange(128) + 0.5) / 128, FP4_CODE_CDF).clamp(max=7).repeat(2)
    | (torch.arange(256) >= 128).long() << 3
).to(torch.uint8)


def flash_slice_config(layers: int = 3, mtp: bool = False) -> ModelConfig:
    """`mtp`: with V4 Flash's MTP block after the layers (a sliding-window block, as V4 Flash's layer 43)."""
    if layers < 1:
        raise Ds4pyError("--layers must be at least 1")
    ratios = [0, 4, 128] if layers == 3 else REAL_PATTERN[:layers]
    return ModelConfig(
        num_hidden_layers=layers, compress_ratios=ratios + [0] * mtp, num_hash_layers=min(3, max(layers - 2, 1)),
        num_nextn_predict_layers=int(mtp), max_position_embeddings=1048576,
    )


def fp8_block(shape: tuple[int, int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [out, in] FP8 e4m3 weight with std ~ 1/sqrt(in) and its UE8M0 128x128 block scales."""
    out, inp = shape
    exponent = -4  # scale 2**-4: e4m3 values of std 16/sqrt(in) stay far inside +-448
    w = torch.randn(out, inp, generator=g) * (2.0**-exponent / inp**0.5)
    scale = torch.full(((out + 127) // 128, (inp + 127) // 128), 127 + exponent, dtype=torch.uint8)
    return w.to(torch.float8_e4m3fn), scale


def fp4_expert(shape: tuple[int, int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [out, in] FP4 e2m1 expert (packed [out, in/2], low nibble first) with per-32 UE8M0 scales."""
    out, inp = shape
    codes = FP4_BYTE_TO_CODE[torch.randint(0, 256, (out, inp), generator=g, dtype=torch.uint8).int()]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    exponent = -round(0.5 * torch.log2(torch.tensor(float(inp))).item())  # values ~ 1/sqrt(in)
    scale = torch.full((out, inp // 32), 127 + exponent, dtype=torch.uint8)
    return packed, scale


def official_tensors(config: ModelConfig, name: str, shape: tuple[int, ...], g: torch.Generator):
    """Yield (official name, tensor) pairs for one canonical tensor."""
    kind = storage(name)
    if kind == "fp4":  # a stacked expert name -> one tensor pair per expert
        stem = name.rsplit(".", 1)
        for e in range(shape[0]):
            packed, scale = fp4_expert(shape[1:], g)
            yield f"{stem[0]}.{e}.{stem[1]}.weight", packed.view(torch.int8)
            yield f"{stem[0]}.{e}.{stem[1]}.scale", scale.view(torch.float8_e8m0fnu)
    elif kind == "fp8":
        w, scale = fp8_block(shape, g)
        yield name, w
        yield name.removesuffix(".weight") + ".scale", scale.view(torch.float8_e8m0fnu)
    else:
        t = random_tensor(name, shape, config, g)
        yield name, t.to(torch.bfloat16) if kind == "bf16" else t


def write_official(config: ModelConfig, out_dir: Path, seed: int = 0, shard_bytes: int = 2 * 2**30) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, index, n_shard, total = 0, {}, 0, 0

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, fname))
            n_shard += 1
            shard, size = {}, 0

    for name, shape in expected_shapes(config, mtp=True).items():
        for tname, t in official_tensors(config, name, shape, g):
            shard[tname] = t.contiguous()
            nbytes = t.numel() * t.element_size()
            size += nbytes
            total += nbytes
            if size >= shard_bytes:
                flush()
    flush()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128]}
    cfg["expert_dtype"] = "fp4"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if config.vocab_size == V4_VOCAB:  # the real vocabulary: ship the real tokenizer with it
        from ds4py.tokenizer import default_tokenizer_dir

        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(default_tokenizer_dir() / name, out_dir / name)


def make_model(out: str, preset: str = "tiny", layers: int | None = None, fmt: str = "gguf", seed: int = 0,
               force: bool = False, routed_experts: int | None = None, mtp: bool = False) -> Path:
    """Write the preset's random model to `out`. `routed_experts` replaces the preset's number of routed experts
    (of the same shape; as many active per token): a flash-slice with fewer of them keeps V4 Flash's per-token
    work at a fraction of its size (the benchmark's model for engines that hold every weight in bf16). `mtp`: the
    GGUF keeps the MTP block (the tiny preset's official layout always has one, and the GGUF leaves it out without
    `mtp`), and a flash-slice gets one (random, so its guesses are almost never right: it measures speculative
    decoding's costs)."""
    out_path = Path(out)
    if out_path.exists() and not force:
        raise Ds4pyError(f"{out_path} already exists: choose another path or pass --force")
    if preset == "tiny":
        # the real vocabulary, so text prompts and the real tokenizer work with it
        config = tiny_config(num_hidden_layers=layers or 4, vocab_size=V4_VOCAB,
                             compress_ratios=([0, 4, 128, 4] * 8)[: (layers or 4)] + [0])
    elif preset == "flash-slice":
        config = flash_slice_config(layers or 3, mtp)
    else:
        raise Ds4pyError(f"unknown preset {preset!r}: use tiny or flash-slice")
    if routed_experts is not None:
        if routed_experts < config.num_experts_per_tok:
            raise Ds4pyError(f"--routed-experts {routed_experts}: the {preset} preset routes each token to "
                             f"{config.num_experts_per_tok} experts, so it needs at least that many")
        config = dataclasses.replace(config, n_routed_experts=routed_experts)
    if fmt == "official":
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        write_official(config, out_path, seed)
        return out_path
    if fmt != "gguf":
        raise Ds4pyError(f"unknown format {fmt!r}: use official or gguf")
    from ds4py.convert import convert

    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.exists() else None) as tmp:
        write_official(config, Path(tmp) / "official", seed)
        convert(Path(tmp) / "official", out_path, force=force, progress=True, mtp=mtp)
    return out_path
