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


MTP_OWN = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn",
           "hc_head_base", "hc_head_scale")


def transformers_mtp_logits(config: ModelConfig, weights: dict[str, torch.Tensor], ids: list[int],
                            next_ids: list[int]) -> torch.Tensor:
    """The MTP block's logits [T, vocab] over a whole sequence, as DeepSeek's V4 `MTPBlock.forward` composes it,
    from transformers' own modules: a DeepseekV4ForCausalLM of num_hidden_layers + 1 layers whose extra layer holds
    the MTP block's weights; hooks take the streams after layer n - 1, give the extra layer
    e_proj(enorm(embed(next_ids))) + h_proj(hnorm(streams)) instead, and its output goes through the MTP block's
    own hc head and norm, then the shared head (transformers builds no MTP block itself)."""
    from dataclasses import replace

    import torch.nn.functional as F
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead, DeepseekV4RMSNorm

    n = config.num_hidden_layers
    wider = replace(config, num_hidden_layers=n + 1)
    block = {f"layers.{n}.{k[len('mtp.0.'):]}": v for k, v in weights.items()
             if k.startswith("mtp.0.") and k[len("mtp.0."):] not in MTP_OWN}
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    model = transformers_model(wider, {**main, **block})
    mtp = {k: weights["mtp.0." + k] for k in MTP_OWN}
    hf_config = model.config
    enorm, hnorm, norm = (DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in range(3))
    for module, name in ((enorm, "enorm.weight"), (hnorm, "hnorm.weight"), (norm, "norm.weight")):
        module.weight.data.copy_(mtp[name])
    hc_head = DeepseekV4HyperHead(hf_config)
    hc_head.hc_fn.data.copy_(mtp["hc_head_fn"])
    hc_head.hc_base.data.copy_(mtp["hc_head_base"])
    hc_head.hc_scale.data.copy_(mtp["hc_head_scale"])
    layers = model.model.layers
    next_t = torch.tensor([next_ids])
    seen = {}

    def take_streams(_module, _args, out):
        seen["streams"] = out

    def mtp_input(_module, args, kwargs):
        e = F.linear(enorm(model.model.embed_tokens(next_t)), mtp["e_proj.weight"])      # [1, T, D]
        h = F.linear(hnorm(seen["streams"]), mtp["h_proj.weight"])                       # [1, T, hc, D]
        return (e.unsqueeze(2) + h, *args[1:]), {**kwargs, "input_ids": next_t}

    def take_output(_module, _args, out):
        seen["mtp"] = out

    hooks = [layers[n - 1].register_forward_hook(take_streams),
             layers[n].register_forward_pre_hook(mtp_input, with_kwargs=True),
             layers[n].register_forward_hook(take_output)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), use_cache=False)
            return model.lm_head(norm(hc_head(seen["mtp"])))[0].float()
    finally:
        for h in hooks:
            h.remove()
