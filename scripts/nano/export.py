"""Step 3 of the nano model: the trained checkpoint -> ds4py/assets/nano/nano.gguf (BF16 matrices, F32
vectors, the trained tokenizer and the V4 chat template), through ds4py's own converter: the canonical
tensors are written as an unquantized official-layout checkpoint first.

    python scripts/nano/export.py WORKDIR [OUT.gguf]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import nano_config  # noqa: E402

from ds4py.convert import convert  # noqa: E402
from ds4py.loaders.hf_names import from_transformers_state_dict  # noqa: E402
from ds4py.loaders.names import expected_shapes  # noqa: E402
from ds4py.loaders.official import save_official  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "ds4py" / "assets" / "nano" / "nano.gguf"


def export(work: Path, out: Path = DEFAULT_OUT) -> Path:
    config = nano_config()
    state = torch.load(work / "ckpt.pt", weights_only=False)["model"]
    weights = from_transformers_state_dict(state, list(expected_shapes(config, mtp=False)))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ds4py-nano"
        save_official(weights, config, src, quantize=False)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(work / "tokenizer" / name, src / name)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(src, out, type="bf16", experts="bf16", force=True, progress=False)
    return out


if __name__ == "__main__":
    work = Path(sys.argv[1])
    print(export(work, Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT))
