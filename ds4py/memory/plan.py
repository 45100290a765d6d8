"""Choose how to hold the weights: everything resident when it fits the budget, else the non-expert
weights resident and the routed experts streamed through an LRU cache sized to what is left."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ds4py.errors import Ds4pyError
from ds4py.loaders import WeightSource

EXPERT_STACK = re.compile(r"^layers\.\d+\.ffn\.experts\.w[123]$")
UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5G' or a byte count -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise Ds4pyError(f"cannot read the size {text!r}: write it like 8G, 512M or 1.5G")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@dataclass
class MemoryPlan:
    mode: str                # "resident" or "stream-experts"
    budget: int | None
    resident_bytes: int      # weights kept in memory
    expert_bytes: int        # all routed experts
    cache_bytes: int = 0     # the expert cache's capacity in stream-experts mode
    reason: str = ""         # why this mode, when it was not asked for

    def describe(self) -> str:
        gib = 2**30
        if self.mode == "resident":
            return f"memory mode resident: {(self.resident_bytes + self.expert_bytes) / gib:.2f} GiB of weights"
        why = f" ({self.reason})" if self.reason else ""
        return (f"memory mode stream-experts{why}: {self.resident_bytes / gib:.2f} GiB resident, routed experts "
                f"({self.expert_bytes / gib:.2f} GiB) streamed through a {self.cache_bytes / gib:.2f} GiB cache")


FLOAT_SIZES = {"f32": 4, "bf16": 2, "f16": 2}


def weight_bytes(source: WeightSource, compute_size: int | None = None) -> tuple[int, int]:
    """(non-expert bytes, routed-expert bytes) in memory, without reading the data: packed formats as
    stored; float tensors (F32/BF16/F16) at `compute_size` bytes per value when given, since they are
    converted once to the compute dtype, except those held in bf16 (`ds4py.formats.stays_bf16`; the router
    weights are always float32 and not among them)."""
    import torch

    from ds4py.formats import stays_bf16
    from ds4py.loaders.names import expected_shapes

    sizes = source.metadata.get("tensor_nbytes") or {}
    kinds = source.metadata.get("tensor_kinds") or {}
    try:
        shapes = expected_shapes(source.config)
    except Exception:  # a source without a full config: count every float tensor as converted
        shapes = {}
    resident = experts = 0
    for name in source.names():
        n = sizes.get(name)
        if n is None:
            n = source.get(name).nbytes
        kind = kinds.get(name, "")
        stored = FLOAT_SIZES.get(kind)
        kept = (kind == "bf16" and not name.endswith("ffn.gate.weight")
                and stays_bf16(name, tuple(shapes.get(name, ())), torch.bfloat16))
        if compute_size and stored and not kept and not name.endswith("tid2eid"):
            n = n // stored * compute_size
        if EXPERT_STACK.match(name):
            experts += n
        else:
            resident += n
    return resident, experts


def available_memory() -> int | None:
    """What this process may still use: the kernel's MemAvailable, capped by a cgroup (v2) limit."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def working_memory(config, prefill_chunk: int = 256) -> int:
    """Bytes to keep free beside the weights: a prefill chunk's logits (float32, plus a copy) and its
    activations (hc_mult streams of hidden floats, ~16 live copies), plus 32 MiB of slack."""
    logits = prefill_chunk * config.vocab_size * 4 * 2
    activations = prefill_chunk * config.hidden_size * config.hc_mult * 4 * 16
    return 32 * 2**20 + logits + activations


def plan_memory(source: WeightSource, budget: int | None, overhead: int | None = None,
                compute_size: int = 4) -> MemoryPlan:
    """With a budget, fit it (`overhead`, the working memory, counts against it). Without one, load
    everything if it fits in the memory available now, else stream the routed experts through a cache
    of most of what is available (instead of dying)."""
    resident, experts = weight_bytes(source, compute_size)
    if overhead is None:
        overhead = working_memory(source.config)
    if budget is None:
        avail = available_memory()
        if avail is None or resident + experts + overhead <= avail * 0.9 or not source.expert_readers:
            return MemoryPlan("resident", None, resident, experts)
        plan = plan_memory(source, int(avail * 0.8), overhead, compute_size)
        plan.reason = (f"the weights ({(resident + experts) / 2**30:.1f} GiB) do not fit in the "
                       f"{avail / 2**30:.1f} GiB available")
        return plan
    if resident + experts + overhead <= budget:
        return MemoryPlan("resident", budget, resident, experts)
    if not source.expert_readers:
        raise Ds4pyError(
            f"the weights need {(resident + experts) / 2**30:.2f} GiB, over the memory budget of "
            f"{budget / 2**30:.2f} GiB, and {source.path} cannot stream its experts: use a GGUF file, or raise "
            "--memory-budget"
        )
    cache = budget - resident - overhead
    if cache <= 0:
        raise Ds4pyError(
            f"a memory budget of {budget / 2**30:.2f} GiB does not hold the {resident / 2**30:.2f} GiB of "
            f"non-expert weights plus {overhead / 2**20:.0f} MiB of working memory: raise --memory-budget"
            + (" or use --dtype bfloat16 (float tensors then take half the memory)" if compute_size == 4 else "")
        )
    return MemoryPlan("stream-experts", budget, resident, experts, cache_bytes=cache)
