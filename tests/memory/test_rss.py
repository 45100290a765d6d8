"""Expert streaming keeps memory under the budget: a model 2.3x larger than the budget runs with peak
RSS growth (over the Python + torch runtime measured first in the same process) within the budget plus
16 MiB of allocator slack, and gives the resident mode's logits and tokens exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds4py.config import tiny_config
from ds4py.convert import convert
from ds4py.synthetic import write_official

ROOT = Path(__file__).resolve().parents[2]
SLACK = 16 * 2**20


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    """220 MB as GGUF (Q8_0, MXFP4 experts), 96% of it routed experts: 8 layers of 128 experts."""
    tmp = tmp_path_factory.mktemp("rss")
    cfg = tiny_config(hidden_size=256, moe_intermediate_size=512, n_routed_experts=128, num_experts_per_tok=2,
                      num_hidden_layers=8, compress_ratios=[0, 4, 128, 4, 0, 4, 128, 4, 0])
    write_official(cfg, tmp / "official", seed=1)
    convert(tmp / "official", tmp / "m.gguf", progress=False)
    return tmp / "m.gguf"


def probe(model: Path, budget: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.memory.rss_probe", str(model), budget, str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streaming_under_budget_matches_resident(big_experts, tmp_path):
    budget = 90 * 2**20
    resident = probe(big_experts, "none", tmp_path / "resident.pt")
    streamed = probe(big_experts, str(budget), tmp_path / "streamed.pt")
    assert resident["mode"] == "resident" and streamed["mode"] == "stream-experts"
    assert streamed["weights"] > 2.3 * budget
    growth = streamed["peak"] - streamed["baseline"]
    assert growth <= budget + SLACK, f"RSS grew {growth / 2**20:.1f} MiB under a {budget / 2**20:.0f} MiB budget"
    assert resident["peak"] - resident["baseline"] > streamed["weights"]  # the resident run did hold it all
    a, b = torch.load(tmp_path / "resident.pt"), torch.load(tmp_path / "streamed.pt")
    assert torch.equal(a["logits"], b["logits"]) and a["tokens"] == b["tokens"]
    assert streamed["stats"]["evictions"] > 0
