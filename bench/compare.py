"""ds4py against llama.cpp and transformers on the same model, in one run; prints tokens/s and ratios.

    python bench/compare.py [--slice-layers 3] [--slice-experts 16] [--threads 2] [-p 512] [-n 128] [--rounds 5]
                            [--depth 4096]
                            [--only nano|tiny|flash-slice|flash-slice-few] [--workdir ...]

Models: the bundled `nano` model (trained, bf16 weights), the `tiny` preset, a `flash-slice` (real V4 Flash
shapes, few layers) and `flash-slice-few`, the same with 16 routed experts of the real shape instead of 256 (as
many active per token, so a decoded token's work is the flash-slice's; its bf16 weights fit transformers where
the flash-slice's 42 GB do not), the last three made with `ds4py make-model` as GGUF (Q8_0 + MXFP4 experts, like
the published GGUFs) unless already present.
llama.cpp: `llama-bench` from $LLAMA_BENCH, or PATH, or a local build of the vendored llama.cpp at
/tmp/llbuild/bin (built outside this repository); skipped with a message when absent.
transformers: DeepseekV4ForCausalLM with the same weights dequantized to bf16; skipped when those
would not fit in half of this machine's memory. Its prefill computes the last position's logits only
(`logits_to_keep=1`, as its `generate` does, and as ds4py and llama-bench do).
Each engine runs in its own process so peak RSS is its own, after the model file has been read once to warm the
page cache (when it is under 3/4 of the memory: the 12.9 GB flash-slice is, on 24 GB).
With --rounds N, ds4py, llama.cpp and transformers (where it fits) run in turn N times and the table gives
the medians (each ratio: the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def find_llama_bench() -> str | None:
    for candidate in (os.environ.get("LLAMA_BENCH"), shutil.which("llama-bench"), "/tmp/llbuild/bin/llama-bench"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def ds4py_env() -> dict:
    """The environment for the ds4py children: `python -m`/`-c` put the working directory first on
    sys.path, so run from a checkout (say a worktree behind the installed one) they would import that
    checkout's ds4py while this process, run as bench/compare.py, imports the installed one. Drop the
    working directory (PYTHONSAFEPATH, Python 3.11+) and put the parent's ds4py first so every process
    measures the same code."""
    import ds4py

    root = str(Path(ds4py.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONSAFEPATH="1")  # no working directory on the children's sys.path
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    return env


def ds4py_version() -> str:
    import ds4py

    root = Path(ds4py.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        head = ""
    return f"{root}" + (f" @ {head}" if head else "")


def run_ds4py(model: Path, p: int, n: int, threads: int, repeats: int, depth: int = 0) -> dict:
    cmd = [sys.executable, "-m", "ds4py.cli", "bench", str(model), "-p", str(p), "-n", str(n),
           "--threads", str(threads), "--repeats", str(repeats), "--json", "--dtype", "bfloat16",
           "--depths", str(depth)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ds4py_env())
    if proc.returncode != 0:
        return {"error": error_lines(proc)}
    res = json.loads(proc.stdout)
    row = res["results"][0]
    return {"pp": row.get("pp_tps"), "tg": row.get("tg_tps"), "rss": res["facts"]["peak_rss_bytes"],
            "mode": res["facts"].get("memory_mode")}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines that say why a child failed (an assert, an error, a traceback's last line), not just
    the last line of stderr, which after a GGML_ASSERT is a backtrace frame or nothing."""
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    keys = ("GGML_ASSERT", "error", "Error", "failed", "Killed")
    picked = [ln for ln in lines if any(k in ln for k in keys)][:3] or lines[-1:]
    code = proc.returncode
    return picked + [f"(exit {code}" + (f", signal {-code})" if code < 0 else ")")]


def run_llama(bench: str, model: Path, p: int, n: int, threads: int, repeats: int, depth: int = 0) -> dict:
    cmd = [bench, "-m", str(model), "-p", str(p), "-n", str(n), "-t", str(threads), "-r", str(repeats), "-o", "json",
           "-d", str(depth)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    note = None
    if proc.returncode < 0 and "cur_backend_id != -1" in proc.stderr + proc.stdout:
        # On CPUs with AMX this llama.cpp puts the Q8_0 matrices in its AMX buffer type, and the deepseek4 graph
        # then aborts in the scheduler (GGML_ASSERT(*cur_backend_id != -1), seen on a Xeon with AMX): run it again
        # without its extra buffer types (no AMX, no repacked weights), as its users would, and say so
        first = error_lines(proc)
        proc = subprocess.run(cmd + ["--repack", "0"], capture_output=True, text=True)
        note = f"aborted ({' | '.join(first[:1])}); ran again with --repack 0"
    if proc.returncode != 0:
        return {"error": error_lines(proc)}
    rows = json.loads(proc.stdout)
    out = {"note": note} if note else {}
    for r in rows:
        key = "pp" if r.get("n_prompt", 0) else "tg"
        # median of the samples, as ds4py bench reports (avg_ts is their mean)
        samples = r.get("samples_ts") or [r["avg_ts"]]
        out[key] = statistics.median(samples)
        out["commit"] = r.get("build_commit")
    return out


TRANSFORMERS_SNIPPET = r"""
import json, sys, time, torch
from ds4py.loaders.open import open_weights
from ds4py.loaders.hf_names import to_transformers_state_dict
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
path, p, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
src = open_weights(path)
weights = {k: src.get(k).dequantize(torch.float32 if k.endswith("tid2eid") else torch.bfloat16)
           for k in src.names() if not k.startswith("mtp.")}
state = to_transformers_state_dict(weights)
del weights
cfg = DeepseekV4Config(**src.config.to_transformers_dict())
with torch.device("meta"):
    model = DeepseekV4ForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
model.load_state_dict(state, strict=False, assign=True)
model.eval()
ids = torch.randint(0, cfg.vocab_size, (1, p))
with torch.no_grad():
    # warm-up with the same prompt, as ds4py bench does (the first calls build kernels and caches: a cold pass
    # read as 2-4x slower), then the median of 3 prefills, as ds4py and llama-bench report theirs
    out = model(ids, use_cache=True, logits_to_keep=1)
    model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    pps = []
    for _ in range(3):  # the last position's logits only, as its generate() asks for
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        pps.append(p / (time.perf_counter() - t))
    pp = sorted(pps)[1]
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        o = model(tok, past_key_values=pkv, use_cache=True); pkv = o.past_key_values; tok = o.logits[:, -1:].argmax(-1)
    tg = n / (time.perf_counter() - t)
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"pp": pp, "tg": tg, "rss": rss}))
"""


def run_transformers(model: Path, p: int, n: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_SNIPPET, str(model), str(p), str(n), str(threads)],
                          capture_output=True, text=True, env=ds4py_env())
    if proc.returncode != 0:
        return {"error": error_lines(proc)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bf16_bytes(model: Path) -> int:
    from ds4py.loaders.names import expected_shapes
    from ds4py.loaders.open import open_weights

    cfg = open_weights(model).config
    total = 0
    for shape in expected_shapes(cfg, mtp=False).values():
        n = 1
        for d in shape:
            n *= d
        total += 2 * n
    return total


def ensure_model(path: Path, preset: str, layers: int | None, experts: int | None = None) -> Path:
    if not path.exists():
        print(f"making {path} ({preset}) ...", file=sys.stderr)
        t0 = time.time()
        cmd = [sys.executable, "-m", "ds4py.cli", "make-model", str(path), "--preset", preset]
        if layers:
            cmd += ["--layers", str(layers)]
        if experts:
            cmd += ["--routed-experts", str(experts)]
        subprocess.run(cmd, check=True, env=ds4py_env())
        print(f"  made in {time.time() - t0:.0f} s", file=sys.stderr)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the model file once so that the engine about to run finds it in the page cache, as a user's second
    run would: the time to read it from disk is not what is compared. (llama.cpp maps it with MAP_POPULATE and
    reads it all at load; ds4py advises its mapped weights WILLNEED. Before 77509a6 ds4py faulted the
    embedding's rows in as tokens first used them, 4-34 ms a row from this VM's disk, and how much was cached
    depended on the order of the runs and on what transformers' bf16 copy had evicted.)"""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def fmt(x, suffix: str = "") -> str:
    return f"{x:.2f}{suffix}" if isinstance(x, (int, float)) else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ds4py-bench")
    ap.add_argument("--slice-layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slice-experts", type=int, default=16, help="routed experts of the flash-slice-few model")
    ap.add_argument("--only", choices=["nano", "tiny", "flash-slice", "flash-slice-few"], default=None)
    ap.add_argument("--depth", type=int, default=0,
                    help="tokens already in the context when pp and tg are timed (ds4py bench --depths, llama-bench "
                         "-d; transformers runs at depth 0 only and is skipped otherwise)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run ds4py, llama.cpp and transformers in turn this many times and report the median of the "
                         "rounds' ratios (a shared machine's speed drifts over minutes; adjacent runs see the same)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = []
    if args.only in (None, "nano"):  # the bundled trained model: bf16 weights (llama.cpp's deepseek4 graph fails on it)
        import ds4py

        models.append(("nano", Path(ds4py.__file__).parent / "assets" / "nano" / "nano.gguf"))
    if args.only in (None, "tiny"):
        models.append(("tiny", ensure_model(work / "tiny.gguf", "tiny", None)))
    if args.only in (None, "flash-slice"):
        models.append((f"flash-slice-{args.slice_layers}L",
                       ensure_model(work / f"flash-slice-{args.slice_layers}.gguf", "flash-slice", args.slice_layers)))
    if args.only in (None, "flash-slice-few"):
        name = f"flash-slice-{args.slice_layers}L-{args.slice_experts}e"
        models.append((name, ensure_model(work / f"{name}.gguf", "flash-slice", args.slice_layers, args.slice_experts)))
    llama = find_llama_bench()
    if not llama:
        print("llama-bench not found (set LLAMA_BENCH or build llama.cpp outside the repo): skipping llama.cpp",
              file=sys.stderr)
    try:
        import psutil  # noqa: F401

        mem = psutil.virtual_memory().total
    except ImportError:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from ds4py.bench import cpu_kernels

    print(f"ds4py from {ds4py_version()}; CPU kernels: {cpu_kernels()}", file=sys.stderr)
    at = f" @ d{args.depth}" if args.depth else ""
    print(f"threads {args.threads}, pp{args.p}, tg{args.n}{at}, median of {args.repeats} "
          "(transformers: warmed up, pp the median of 3 per round)")
    print("| model | test | ds4py t/s | llama.cpp t/s | ds4py/llama.cpp | transformers t/s | ds4py/transformers |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, path in models:
        hf_p, hf_n = min(args.p, 512), min(args.n, 32)
        hf_fits = bf16_bytes(path) < mem / 2 and not args.depth
        rounds = []  # per round: ds4py, llama.cpp, transformers (each run in turn, so a round sees one speed)
        warm = path.stat().st_size < mem * 3 / 4  # else neither engine can keep it cached anyway
        for _ in range(max(args.rounds, 1)):
            if warm:
                warm_page_cache(path)
            ours = run_ds4py(path, args.p, args.n, args.threads, args.repeats, args.depth)
            if warm and llama:
                warm_page_cache(path)
            theirs = run_llama(llama, path, args.p, args.n, args.threads, args.repeats, args.depth) if llama else {}
            if hf_fits:
                hf = run_transformers(path, hf_p, hf_n, args.threads)
            else:
                why = "not run at a depth" if args.depth else "bf16 weights exceed half the machine's memory"
                hf = {"error": [why]}
            rounds.append((ours, theirs, hf))
        ours, theirs, hf = (dict(r) for r in rounds[0])
        ratio = {}  # (peer, test): the median of the rounds' ratios
        sizes = {"pp": (args.p, hf_p), "tg": (args.n, hf_n)}  # ours, transformers'
        if len(rounds) > 1:
            for test in ("pp", "tg"):
                mine = [r[0][test] for r in rounds if r[0].get(test)]
                if mine:
                    ours[test] = statistics.median(mine)
                for i, (peer, res) in enumerate((("llama.cpp", theirs), ("transformers", hf)), start=1):
                    if peer == "transformers" and sizes[test][0] != sizes[test][1]:
                        continue  # transformers ran a shorter test: no ratio
                    theirs_all = [r[i][test] for r in rounds if r[i].get(test)]
                    if theirs_all:
                        res[test] = statistics.median(theirs_all)
                    ratios = [r[0][test] / r[i][test] for r in rounds if r[0].get(test) and r[i].get(test)]
                    if ratios:
                        ratio[peer, test] = statistics.median(ratios)
                        print(f"  {label} {test}: ds4py/{peer} per round " + ", ".join(f"{r:.2f}x" for r in ratios)
                              + f" (median {ratio[peer, test]:.2f}x); ds4py " + ", ".join(f"{v:.1f}" for v in mine)
                              + f"; {peer} " + ", ".join(f"{v:.1f}" for v in theirs_all), file=sys.stderr)
        for test, (n, hf_size) in sizes.items():
            a, b, c = ours.get(test), theirs.get(test), hf.get(test)
            r1 = ratio.get(("llama.cpp", test)) or (a / b if a and b else None)
            # transformers runs at most pp512/tg32: mark its number, and give no ratio, when sizes differ
            same = hf_size == n
            r2 = (ratio.get(("transformers", test)) or a / c) if a and c and same else None
            c_txt = fmt(c) if same else fmt(c, f" ({test}{hf_size})")
            print(f"| {label} | {test}{n}{at} | {fmt(a)} | {fmt(b)} | {fmt(r1, 'x')} | {c_txt} | {fmt(r2, 'x')} |")
        for name, res in (("ds4py", ours), ("llama.cpp", theirs), ("transformers", hf)):
            if "error" in res:
                print(f"  {label}: {name} failed/skipped: {' | '.join(res['error'])}", file=sys.stderr)
        if "rss" in ours:
            print(f"  {label}: ds4py peak RSS {ours['rss'] / 2**30:.2f} GiB, {ours.get('mode')}", file=sys.stderr)
        if "rss" in hf:
            print(f"  {label}: transformers peak RSS {hf['rss'] / 2**30:.2f} GiB", file=sys.stderr)
        if theirs.get("note"):
            print(f"  {label}: llama.cpp {theirs['note']}", file=sys.stderr)
        if theirs.get("commit"):
            print(f"  {label}: llama.cpp build {theirs['commit']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
