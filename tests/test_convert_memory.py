"""Converting a checkpoint several times larger than a memory limit keeps peak RSS under the limit."""

from __future__ import annotations

import json
import subprocess
import sys

from ds4py.config import tiny_config
from ds4py.synthetic import write_official

SCRIPT = """
import sys
from ds4py.bench import peak_rss_bytes
from ds4py.convert import convert
convert(sys.argv[1], sys.argv[2], progress=False)
print(peak_rss_bytes())
"""


def test_convert_peak_rss_stays_under_a_limit_smaller_than_the_model(tmp_path):
    # ~0.9 GB of weights, mostly FP4 experts (64 experts x 3 x 1024 x 2048), in 128 MB shards
    config = tiny_config(hidden_size=1024, moe_intermediate_size=2048, n_routed_experts=64, num_hidden_layers=4,
                         compress_ratios=[0, 4, 128, 4, 0], vocab_size=4096, num_nextn_predict_layers=0)
    src = tmp_path / "big"
    write_official(config, src, seed=0, shard_bytes=128 * 2**20)
    model_bytes = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    limit = 450 * 2**20  # measured peak: ~330 MiB, of which ~220 MiB is Python + torch + gguf themselves
    assert model_bytes > 1.8 * limit
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "big.gguf")],
                         capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < limit, f"peak RSS {peak / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
    assert (tmp_path / "big.gguf").stat().st_size > 0.9 * model_bytes
