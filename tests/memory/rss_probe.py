"""Run in a fresh process: load a model under a memory budget, compute logits (300 tokens: two prefill
chunks) and a short greedy generation (one prefill, 7 decode steps; each step's logits kept), and report
the RSS growth over the runtime's own baseline (VmHWM - VmRSS before loading).

    python -m tests.memory.rss_probe MODEL BUDGET|none OUT.pt
"""

from __future__ import annotations

import json
import sys

import torch

import ds4py
from ds4py.formats import kernels
from ds4py.loaders.open import open_weights
from ds4py.memory.plan import weight_bytes, working_memory


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> None:
    path, budget, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.nn.functional.linear(torch.randn(300, 256), torch.randn(512, 256))  # runtime warm-up
    kernels.available()
    base = status("VmRSS:")
    model = ds4py.load(path, memory_budget=None if budget == "none" else budget)
    logits = model.logits(ids)
    steps = list(model.stream(ids[:40], 8, lambda step_logits, _ids: int(step_logits.argmax())))
    torch.save({"logits": logits, "tokens": [s.token for s in steps],
                "step_logits": torch.stack([s.logits for s in steps])}, out)
    peak = status("VmHWM:")
    src = open_weights(path)
    plan = model.memory_plan
    print(json.dumps({"baseline": base, "peak": peak, "mode": plan.mode, "describe": plan.describe(),
                      "weights": sum(weight_bytes(src)), "non_expert": weight_bytes(src, 4)[0],
                      "working": working_memory(src.config, plan.prefill_chunk), "cache": plan.cache_bytes,
                      "kept_layers": plan.kept_layers,
                      "stats": model.expert_cache.stats.as_dict() if model.expert_cache else None,
                      "layer_stats": model.layer_stream.stats.as_dict() if model.layer_stream else None}))


if __name__ == "__main__":
    main()
