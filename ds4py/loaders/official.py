"""The official DeepSeek V4 checkpoint: config.json + safetensors shards. FP8 weights carry a sibling
`<stem>.scale` (UE8M0, 128x128 blocks); routed experts `layers.{i}.ffn.experts.{e}.w{1,2,3}.weight`
are FP4 (two e2m1 codes per byte) with per-32 UE8M0 `.scale`, stacked here per layer without
dequantizing. Tensors are read only when the model asks for them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ds4py.config import ModelConfig
from ds4py.errors import ModelFormatError
from ds4py.formats import Dense, Weight
from ds4py.formats.fp4 import FP4Block, quantize_fp4
from ds4py.formats.fp8 import FP8Block, quantize_fp8_block
from ds4py.loaders import WeightSource
from ds4py.loaders.names import expected_shapes, storage
from ds4py.loaders.safetensors_files import SafetensorsDir

EXPERT_STACK = re.compile(r"^(.*\.ffn\.experts)\.(w[123])$")
FLOAT8 = ("F8_E4M3",)
PACKED_FP4 = ("I8", "U8", "F4")


def is_official_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def open_official(path: str | Path) -> WeightSource:
    root = Path(path)
    config = ModelConfig.from_file(root / "config.json")
    files = SafetensorsDir(root)
    shapes = expected_shapes(config, mtp=any(n.startswith("mtp.") for n in files.names()))
    loaders, readers, nbytes, kinds = {}, {}, {}, {}
    problems = []

    def weight_of(name: str) -> Weight:
        stem = name.removesuffix(".weight")
        dtype = files.dtype(name)
        if dtype in FLOAT8 and stem + ".scale" in files.where:
            return FP8Block(files.get(name), files.get(stem + ".scale"))
        if dtype in PACKED_FP4 and stem + ".scale" in files.where:
            return FP4Block(files.get(name), files.get(stem + ".scale"))
        return Dense(files.get(name))

    def kind_of(name: str) -> str:
        """The Weight.kind `weight_of(name)` will have, from the header alone."""
        dtype, scaled = files.dtype(name), name.removesuffix(".weight") + ".scale" in files.where
        if scaled and dtype in FLOAT8:
            return "fp8"
        if scaled and dtype in PACKED_FP4:
            return "fp4"
        return {"F32": "f32", "BF16": "bf16", "F16": "f16"}.get(dtype, dtype.lower())

    def logical_shape(name: str) -> tuple[int, ...]:
        shape = files.shape(name)
        stem = name.removesuffix(".weight")
        if files.dtype(name) in PACKED_FP4 and stem + ".scale" in files.where:
            return (*shape[:-1], shape[-1] * 2)
        return shape

    for name, shape in shapes.items():
        m = EXPERT_STACK.match(name)
        if m:
            per_expert = [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(shape[0])]
            absent = [n for n in per_expert if n not in files.where]
            if absent:
                problems.append(f"missing {len(absent)} expert tensor(s), first {absent[0]}")
                continue
            got = logical_shape(per_expert[0])
            if got != shape[1:]:
                problems.append(f"{per_expert[0]} has shape {list(got)}, expected {list(shape[1:])}")
                continue
            loaders[name] = lambda per_expert=per_expert: stack_experts([weight_of(n) for n in per_expert])
            kinds[name] = kind_of(per_expert[0])
            readers[name] = lambda e, per_expert=per_expert: weight_of(per_expert[e])
            nbytes[name] = sum(files.nbytes(n) + files.nbytes(n.removesuffix(".weight") + ".scale")
                               if n.removesuffix(".weight") + ".scale" in files.where else files.nbytes(n)
                               for n in per_expert)
            continue
        if name not in files.where:
            problems.append(f"missing tensor {name}")
            continue
        got = logical_shape(name)
        if got != shape:
            problems.append(f"{name} has shape {list(got)}, expected {list(shape)}")
            continue
        loaders[name] = lambda name=name: weight_of(name)
        nbytes[name] = files.nbytes(name)
        kinds[name] = kind_of(name)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelFormatError(
            f"{root}: does not match its config.json as a DeepSeek V4 checkpoint: {'; '.join(problems[:3])}{more}. "
            "Check that every shard downloaded completely and belongs to this config."
        )
    return WeightSource(path=root, config=config, loaders=loaders, kind="official",
                        metadata={"tensor_nbytes": nbytes, "tensor_kinds": kinds}, expert_readers=readers)


def stack_experts(weights: list[Weight]) -> Weight:
    first = weights[0]
    if isinstance(first, FP4Block):
        return FP4Block(torch.stack([w.packed for w in weights]), torch.stack([w.scale for w in weights]))
    if isinstance(first, FP8Block):
        return FP8Block(torch.stack([w.weight for w in weights]), torch.stack([w.scale for w in weights]))
    return Dense(torch.stack([w.dequantize(w.tensor.dtype) for w in weights]))


def save_official(weights: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                  shard_size: int | None = None, quantize: bool = True) -> Path:
    """Write canonical float tensors in the official layout: FP8 + 128x128 UE8M0 scales for the FP8
    projections, FP4 + per-32 UE8M0 for routed experts, BF16 and F32 as the real checkpoint stores
    them (or everything in float32 with quantize=False). Sharded when `shard_size` (bytes) is set."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        kind = storage(name) if quantize else ("i32" if name.endswith("tid2eid") else "f32")
        m = EXPERT_STACK.match(name)
        if m and kind == "fp4":
            packed, scale = quantize_fp4(t)
            for e in range(t.shape[0]):
                stem = f"{m.group(1)}.{e}.{m.group(2)}"
                tensors[stem + ".weight"] = packed[e].view(torch.int8).contiguous()
                tensors[stem + ".scale"] = scale[e].view(torch.float8_e8m0fnu).contiguous()
        elif m:
            for e in range(t.shape[0]):
                tensors[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].contiguous()
        elif kind == "fp8":
            w, scale = quantize_fp8_block(t)
            tensors[name] = w
            tensors[name.removesuffix(".weight") + ".scale"] = scale.view(torch.float8_e8m0fnu)
        elif kind == "bf16":
            tensors[name] = t.to(torch.bfloat16)
        elif kind == "i32":
            tensors[name] = t.to(torch.int32)
        else:
            tensors[name] = t.float()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shard_size and size and size + n > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = config.to_dict()
    if quantize:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "weight_block_size": [128, 128]}
        cfg["expert_dtype"] = "fp4"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
