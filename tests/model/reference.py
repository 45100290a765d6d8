"""The independent reference: transformers' DeepseekV4ForCausalLM loaded with the same weights."""

from __future__ import annotations

import torch

from ds4py.config import ModelConfig


def transformers_model(config: ModelConfig, weights: dict[str, torch.Tensor]):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers.utils import logging

    from ds4py.loaders.hf_names import to_transformers_state_dict

    logging.set_verbosity_error()
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config.to_transformers_dict())).eval()
    state = to_transformers_state_dict(weights)
    model.load_state_dict(state, strict=True)
    return model
