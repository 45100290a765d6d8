"""ds4py: an inference engine for DeepSeek V4 Flash."""

from __future__ import annotations

__version__ = "0.1.0"

DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "f16": "float16"}


def load(path, device: str = "cpu", dtype: str = "float32", ctx: int | None = None, progress: bool = False,
         memory_budget: int | str | None = None, read_ahead: str | bool | None = None, mtp: str | None = None):
    """Load a model: an official checkpoint directory, a transformers-layout directory or a
    deepseek4 GGUF file (or an already opened WeightSource). Returns a `ds4py.engine.Model`.

    `memory_budget` (bytes or '8G'): when the weights do not fit, the routed experts are streamed
    from the file through an LRU cache that fills what the budget leaves; when even the non-expert
    weights do not fit, layers are also built from the file as they run (`ds4py.memory.plan`).
    `read_ahead` (streaming modes): which prediction of the next layer's experts to read in the
    background ("gate", "previous", "hash"; True or "on" for gate), or False/"off"; when not given,
    the DS4PY_READ_AHEAD environment variable, else off: it cuts cache misses but has not yet been
    shown to save time (`ds4py.memory.read_ahead`). `mtp`: a file holding the MTP block for speculative decoding
    (llama.cpp's mtp-*.gguf; the published GGUFs leave the block out), used in place of the model's own."""
    import torch

    from ds4py.engine import Model
    from ds4py.errors import Ds4pyError
    from ds4py.loaders import WeightSource
    from ds4py.model.transformer import build_transformer

    if dtype not in DTYPES:
        raise Ds4pyError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16")
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Ds4pyError(f"device {device!r} asked for but CUDA is not available here: use device='cpu'")
    if isinstance(path, WeightSource):
        source = path
    else:
        from ds4py.loaders.open import open_weights

        source = open_weights(path)
    if mtp:
        from ds4py.loaders.mtp_file import attach_mtp

        source = attach_mtp(source, mtp)
    from ds4py.memory.expert_cache import ExpertCache
    from ds4py.memory.heap import retain_freed_memory
    from ds4py.memory.plan import parse_size, plan_memory

    retain_freed_memory()  # prefill's large temporaries reused, not faulted in again page by page

    compute_size = torch.tensor([], dtype=getattr(torch, DTYPES[dtype])).element_size()
    plan = plan_memory(source, parse_size(memory_budget), compute_size=compute_size)
    expert_cache = ExpertCache(plan.cache_bytes) if plan.mode != "resident" else None
    ahead = None
    if plan.mode != "resident":
        ahead = read_ahead_predictor(read_ahead)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source.names()), desc=f"loading {source.path.name}", unit="tensor", leave=False)
    transformer = build_transformer(
        source, device=device, dtype=getattr(torch, DTYPES[dtype]),
        progress=(lambda _n: bar.update(1)) if bar else None, expert_cache=expert_cache,
        keep_layers=plan.kept_layers if plan.mode == "stream-layers" else None, read_ahead=ahead,
    )
    if bar:
        bar.close()
    model = Model(transformer, ctx=ctx, source=source, prefill_chunk=plan.prefill_chunk)
    model.memory_plan, model.expert_cache = plan, expert_cache
    model.layer_stream = transformer.blocks if plan.mode == "stream-layers" else None
    return model


def read_ahead_predictor(option: str | bool | None) -> str | None:
    """The read-ahead option (or DS4PY_READ_AHEAD when None) -> a predictor name, or None for off."""
    import os

    from ds4py.errors import Ds4pyError
    from ds4py.memory.read_ahead import DEFAULT_PREDICTOR, PREDICTORS

    if option is None:
        option = os.environ.get("DS4PY_READ_AHEAD", "off")
    if option is True or str(option).lower() in ("on", "1", "true", "yes"):
        return DEFAULT_PREDICTOR
    if option is False or str(option).lower() in ("off", "0", "false", "no", ""):
        return None
    if option not in PREDICTORS:
        raise Ds4pyError(f"unknown read-ahead {option!r}: use on, off or one of {', '.join(PREDICTORS)}")
    return option
