"""A directory saved by transformers' DeepseekV4ForCausalLM (`model.layers.N.self_attn.q_a_proj...`,
merged `mlp.experts.gate_up_proj` [E, 2I, D] and `mlp.experts.down_proj` [E, D, I])."""

from __future__ import annotations

import re
from pathlib import Path

from ds4py.config import ModelConfig
from ds4py.errors import ModelFormatError
from ds4py.formats import Dense
from ds4py.loaders import WeightSource
from ds4py.loaders.hf_names import to_transformers_name
from ds4py.loaders.names import expected_shapes
from ds4py.loaders.safetensors_files import SafetensorsDir

EXPERT_STACK = re.compile(r"^layers\.(\d+)\.ffn\.experts\.w([123])$")


def is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors")) and any(
        n.startswith("model.layers.") for n in SafetensorsDir(path).names()
    )


def open_transformers(path: str | Path) -> WeightSource:
    root = Path(path)
    config = ModelConfig.from_file(root / "config.json")
    files = SafetensorsDir(root)
    loaders, problems = {}, []
    inter = config.moe_intermediate_size
    for name, shape in expected_shapes(config, mtp=False).items():
        m = EXPERT_STACK.match(name)
        if m:
            i, k = m.groups()
            hf = f"model.layers.{i}.mlp.experts." + ("down_proj" if k == "2" else "gate_up_proj")
            if hf not in files.where:
                problems.append(f"missing tensor {hf}")
                continue
            part = {"1": slice(0, inter), "3": slice(inter, 2 * inter), "2": slice(None)}[k]
            loaders[name] = lambda hf=hf, part=part: Dense(files.get(hf)[:, part].contiguous())
            continue
        hf = to_transformers_name(name)
        if hf not in files.where:
            problems.append(f"missing tensor {hf}")
        elif files.shape(hf) != shape:
            problems.append(f"{hf} has shape {list(files.shape(hf))}, expected {list(shape)}")
        else:
            loaders[name] = lambda hf=hf: Dense(files.get(hf))
    if problems:
        raise ModelFormatError(f"{root}: not a complete DeepseekV4ForCausalLM checkpoint: {'; '.join(problems[:3])}")
    return WeightSource(path=root, config=config, loaders=loaders, kind="transformers")
