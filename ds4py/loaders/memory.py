"""A WeightSource over tensors already in memory (random test models, freshly trained weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from ds4py.config import ModelConfig
from ds4py.formats import Dense
from ds4py.loaders import WeightSource


def from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], path: str = "<memory>") -> WeightSource:
    loaders = {name: (lambda t=t: Dense(t)) for name, t in tensors.items()}
    return WeightSource(path=Path(path), config=config, loaders=loaders, kind="memory")
