"""Choose how to hold the weights under a memory budget, as it shrinks:
- resident: everything in memory;
- stream-experts: the non-expert weights resident, the routed experts read on demand into an LRU cache
  sized to what is left (`ds4py.memory.expert_cache`);
- stream-layers: even the non-expert weights do not fit: the embeddings and head resident, the layers
  that fit built once and kept, the others built from the file each time they run and dropped after
  (`ds4py.memory.layer_stream`), with the experts streamed as above."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ds4py.errors import Ds4pyError
from ds4py.loaders import WeightSource

EXPERT_STACK = re.compile(r"^layers\.\d+\.ffn\.experts\.w[123]$")
LAYER = re.compile(r"^layers\.(\d+)\.")
UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5G' or a byte count -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise Ds4pyError(f"cannot read the size {text!r}: write it like 8G, 512M or 1.5G")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    mode: str                # "resident", "stream-experts" or "stream-layers"
    budget: int | None
    resident_bytes: int      # weights kept in memory
    expert_bytes: int        # all routed experts
    cache_bytes: int = 0     # the expert cache's capacity in the streaming modes
    reason: str = ""         # why this mode, when it was not asked for
    layers: int = 0                      # stream-layers: the model's layers
    kept_layers: tuple[int, ...] = ()    # stream-layers: the layers built once and kept
    streamed_bytes: int = 0              # stream-layers: the other layers' bytes, read per forward step
    prefill_chunk: int | None = None     # the chunk the working memory was planned for (None: the engine's default)

    def describe(self) -> str:
        if self.mode == "resident":
            return f"memory mode resident: {size(self.resident_bytes + self.expert_bytes)} of weights"
        why = f" ({self.reason})" if self.reason else ""
        experts = f"routed experts ({size(self.expert_bytes)}) streamed through a {size(self.cache_bytes)} cache"
        if self.mode == "stream-experts":
            return f"memory mode stream-experts{why}: {size(self.resident_bytes)} resident, {experts}"
        kept = len(self.kept_layers)
        return (f"memory mode stream-layers{why}: {size(self.resident_bytes)} resident (embeddings, head, "
                f"{kept} of {self.layers} layers); {self.layers - kept} layers ({size(self.streamed_bytes)}) "
                f"built from the file per forward step (each decoded token or prefill chunk); {experts}")


FLOAT_SIZES = {"f32": 4, "bf16": 2, "f16": 2}
# read as float32 whatever the compute dtype (model/transformer.py's `Reader.f32`): norms, the compressors'
# position biases, hyper-connection parameters, attention sinks, the routers
ALWAYS_F32 = re.compile(r"(norm\.weight|\.ape|_fn|_base|_scale|attn_sink|ffn\.gate\.weight|ffn\.gate\.bias)$")


def tensor_bytes(source: WeightSource, compute_size: int | None = None) -> dict[str, int]:
    """Each tensor's bytes in memory, without reading the data: packed formats as stored; float tensors
    (F32/BF16/F16) at `compute_size` bytes per value when given, since they are converted once to the
    compute dtype, except those held in bf16 (`ds4py.formats.stays_bf16`) and those always read as float32
    (`ALWAYS_F32`); the hash tables as int64."""
    import torch

    from ds4py.formats import stays_bf16
    from ds4py.loaders.names import expected_shapes

    sizes = source.metadata.get("tensor_nbytes") or {}
    kinds = source.metadata.get("tensor_kinds") or {}
    try:
        shapes = expected_shapes(source.config)
    except Exception:  # a source without a full config: count every float tensor as converted
        shapes = {}
    out = {}
    for name in source.names():
        n = sizes.get(name)
        if n is None:
            n = source.get(name).nbytes
        kind = kinds.get(name, "")
        stored = FLOAT_SIZES.get(kind)
        if name.endswith("tid2eid"):
            n = n // 4 * 8  # I32 on disk, int64 in memory
        elif compute_size and stored and ALWAYS_F32.search(name):
            n = n // stored * 4
        elif compute_size and stored and not (kind == "bf16" and stays_bf16(name, tuple(shapes.get(name, ())),
                                                                             torch.bfloat16)):
            n = n // stored * compute_size
        out[name] = n
    return out


def weight_bytes(source: WeightSource, compute_size: int | None = None) -> tuple[int, int]:
    """(non-expert bytes, routed-expert bytes) in memory (see `tensor_bytes`)."""
    resident = experts = 0
    for name, n in tensor_bytes(source, compute_size).items():
        if EXPERT_STACK.match(name):
            experts += n
        else:
            resident += n
    return resident, experts


@dataclass
class WeightSizes:
    """The bytes in memory of the parts a memory plan places."""

    shared: int         # embeddings, output head, final norm and hyper-connection head
    layers: list[int]   # each layer's non-expert weights
    mtp: int            # the multi-token-prediction block (speculative decoding)
    experts: int        # every layer's routed experts
    min_cache: int      # one token's routed experts in the largest layer: the smallest useful expert cache

    @property
    def non_expert(self) -> int:
        return self.shared + sum(self.layers) + self.mtp


def weight_sizes(source: WeightSource, compute_size: int | None = None) -> WeightSizes:
    c = source.config
    layers = [0] * c.num_hidden_layers
    shared = mtp = experts = 0
    per_expert = [0] * c.num_hidden_layers  # w1 + w2 + w3 of one expert
    for name, n in tensor_bytes(source, compute_size).items():
        m = LAYER.match(name)
        if EXPERT_STACK.match(name):
            experts += n
            per_expert[int(m.group(1))] += n // c.n_routed_experts
        elif m:
            layers[int(m.group(1))] += n
        elif name.startswith("mtp."):
            mtp += n
        else:
            shared += n
    return WeightSizes(shared, layers, mtp, experts, c.num_experts_per_tok * max(per_expert, default=0))


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


def working_memory(config, prefill_chunk: int | None = None, streaming: bool = False) -> int:
    """Bytes to keep free beside the weights: a prefill chunk's logits (float32, plus a copy) and its
    activations (hc_mult streams of hidden floats, ~16 live copies), plus 32 MiB of slack; unless given, the
    chunk the engine takes by default with the weights resident or (`streaming`) streamed."""
    if prefill_chunk is None:
        from ds4py.engine import default_prefill_chunk

        prefill_chunk = default_prefill_chunk(config, streaming)
    logits = prefill_chunk * config.vocab_size * 4 * 2
    activations = prefill_chunk * config.hidden_size * config.hc_mult * 4 * 16
    return 32 * 2**20 + logits + activations


def plan_memory(source: WeightSource, budget: int | None, overhead: int | None = None,
                compute_size: int = 4) -> MemoryPlan:
    """With a budget, fit it (`overhead`, the working memory, counts against it): everything resident;
    else the non-expert weights resident and the routed experts streamed through a cache of what is
    left (at least one token's experts of a layer); else, when even the non-expert weights do not fit,
    stream-layers (`plan_layers`). Without a budget, load everything if it fits in the memory available
    now, else plan for most of what is available (instead of dying)."""
    sizes = weight_sizes(source, compute_size)
    resident, experts = sizes.non_expert, sizes.experts
    # the resident modes' chunk may be larger than the streaming modes' (`default_prefill_chunk`)
    from ds4py.engine import default_prefill_chunk

    wide, narrow = default_prefill_chunk(source.config), default_prefill_chunk(source.config, streaming=True)
    wide_overhead = overhead if overhead is not None else working_memory(source.config, wide)
    narrow_overhead = overhead if overhead is not None else working_memory(source.config, narrow)
    if budget is None:
        avail = available_memory()
        if avail is None or resident + experts + wide_overhead <= avail * 0.9 or not source.expert_readers:
            return MemoryPlan("resident", None, resident, experts, prefill_chunk=wide)
        plan = plan_memory(source, int(avail * 0.8), overhead, compute_size)
        plan.reason = (f"the weights ({(resident + experts) / 2**30:.1f} GiB) do not fit in the "
                       f"{avail / 2**30:.1f} GiB available")
        return plan
    for chunk, extra in ((wide, wide_overhead), (narrow, narrow_overhead)):
        if resident + experts + extra <= budget:
            return MemoryPlan("resident", budget, resident, experts, prefill_chunk=chunk)
    if not source.expert_readers:
        raise Ds4pyError(
            f"the weights need {(resident + experts) / 2**30:.2f} GiB, over the memory budget of "
            f"{budget / 2**30:.2f} GiB, and {source.path} cannot stream its experts: use a GGUF file, or raise "
            "--memory-budget"
        )
    cache = budget - resident - narrow_overhead
    if cache >= max(sizes.min_cache, 1):
        return MemoryPlan("stream-experts", budget, resident, experts, cache_bytes=cache, prefill_chunk=narrow)
    plan = plan_layers(sizes, budget, narrow_overhead, compute_size)
    plan.prefill_chunk = narrow
    return plan


def plan_layers(sizes: WeightSizes, budget: int, overhead: int, compute_size: int) -> MemoryPlan:
    """stream-layers: the shared weights (embeddings, head) resident, room for the largest layer built
    from the file when it runs and the smallest useful expert cache; what the budget leaves keeps whole
    layers built once (in order, each that fits: the layers run in a cycle, so an LRU of them would miss
    every time), the rest grows the expert cache. The MTP block is built from the file when it runs, as a
    streamed layer (`StreamedMTP`)."""
    largest = max(sizes.layers, default=0)
    need = sizes.shared + largest + sizes.min_cache + overhead
    if budget < need:
        raise Ds4pyError(
            f"a memory budget of {size(budget)} is too small even to stream the weights one layer at a time: that "
            f"needs {size(need)} ({size(sizes.shared)} of embeddings and head, {size(largest)} for the largest "
            f"layer, {size(sizes.min_cache)} for one token's routed experts, {size(overhead)} of working "
            "memory): raise --memory-budget"
            + (" or use --dtype bfloat16 (float tensors then take half the memory)" if compute_size == 4 else "")
        )
    room = budget - need
    kept = []
    for layer, n in enumerate(sizes.layers):
        if n <= room:
            kept.append(layer)
            room -= n
    kept_bytes = sum(sizes.layers[i] for i in kept)
    if len(kept) == len(sizes.layers):  # only the MTP block did not fit: no room for a streamed layer needed
        room += largest
    return MemoryPlan(
        "stream-layers", budget, sizes.shared + kept_bytes, sizes.experts, cache_bytes=sizes.min_cache + room,
        layers=len(sizes.layers), kept_layers=tuple(kept), streamed_bytes=sum(sizes.layers) - kept_bytes,
    )
