"""`ds4py bench`: prefill (pp) and decode (tg) tokens/s at several context depths, median of repeats,
and peak RSS, printed as a llama-bench style table or JSON."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

from ds4py.sampling import greedy


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux's VmHWM, since ru_maxrss survives exec and so can report the
    parent's peak for a freshly started child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(model, prompt_tokens: int, gen_tokens: int, depth: int, repeats: int) -> dict:
    """Median prefill and decode speed after `depth` tokens already in the cache. One prefill of the same length
    runs first, not timed (as llama-bench warms up): a first call builds the compiled calls' plans and the small
    matrices' bf16 copies."""
    vocab = model.config.vocab_size
    base = model.new_cache()
    if depth:
        model.prefill(random_ids(depth, vocab, seed=1), base)
    if prompt_tokens:
        model.prefill(random_ids(prompt_tokens, vocab, seed=9), base.clone())
    pp, tg = [], []
    for r in range(repeats):
        if prompt_tokens:
            cache = base.clone()
            ids = random_ids(prompt_tokens, vocab, seed=10 + r)
            t0 = time.perf_counter()
            model.prefill(ids, cache)
            pp.append(prompt_tokens / (time.perf_counter() - t0))
        if gen_tokens:
            cache = base.clone()
            token = random_ids(1, vocab, seed=20 + r)[0]
            model.prefill([token], cache)  # the first decode step is not timed (warm-up, as llama-bench)
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                logits = model.prefill([token], cache)
                token = greedy(logits)
            tg.append(gen_tokens / (time.perf_counter() - t0))
    out = {"depth": depth}
    if pp:
        out.update(pp_tokens=prompt_tokens, pp_tps=statistics.median(pp), pp_all=pp)
    if tg:
        out.update(tg_tokens=gen_tokens, tg_tps=statistics.median(tg), tg_all=tg)
    return out


def model_facts(model) -> dict:
    t = model.transformer
    kinds, nbytes = {}, 0
    for block in t.blocks:  # one at a time: under stream-layers each is built from the file, then dropped
        for w in (block.attn.wq_a, block.attn.wq_b, block.attn.wkv, block.attn.wo_a, block.attn.wo_b,
                  block.ffn.w1, block.ffn.w2, block.ffn.w3):
            kinds[w.kind] = kinds.get(w.kind, 0) + 1
            nbytes += w.nbytes
    return {"layers": model.config.num_hidden_layers, "weight_kinds": kinds, "block_weight_bytes": nbytes}


def cpu_kernels() -> str:
    """The compiled CPU kernels' instruction set here and whether long prompts use a native bf16 GEMM."""
    from ds4py.formats import kernels

    return f"{kernels.isa()}, bf16 GEMM {'native' if kernels.bf16_gemm_native() else 'none (float32 / int8)'}"


def bench_main(args) -> int:
    from ds4py.cli import load_model, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    t0 = time.perf_counter()
    model = load_model(args, path)
    load_s = time.perf_counter() - t0
    depths = [int(d) for d in str(args.depths).split(",") if d != ""]
    rows = [measure(model, args.prompt_tokens, args.gen_tokens, d, args.repeats) for d in depths]
    tokens = sum(r.get("pp_tokens", 0) + r.get("tg_tokens", 0) for r in rows) * args.repeats
    streamed = {}
    if model.layer_stream is not None:  # before model_facts, which builds every layer once more
        st = model.layer_stream.stats
        streamed["layer_stream"] = {**st.as_dict(), "bytes_read_per_token": st.bytes_read / max(tokens, 1)}
    facts = {
        "model": str(path), "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "load_seconds": load_s, "peak_rss_bytes": peak_rss_bytes(), **model_facts(model),
        "memory_mode": model.memory_plan.describe(), "cpu_kernels": cpu_kernels(), **streamed,
    }
    if model.expert_cache is not None:
        st = model.expert_cache.stats
        facts["expert_cache"] = {**st.as_dict(), "capacity_bytes": model.expert_cache.capacity_bytes,
                                 "bytes_read_per_token": st.bytes_read / max(tokens, 1)}
    if args.json:
        print(json.dumps({"facts": facts, "results": rows}, indent=2))
        return 0
    print("| model | backend | threads | test | t/s |", file=sys.stdout)
    print("| --- | --- | ---: | ---: | ---: |")
    name = str(path).rstrip("/").split("/")[-1]
    for r in rows:
        at = f" @ d{r['depth']}" if r["depth"] else ""
        if "pp_tps" in r:
            print(f"| {name} | ds4py-{args.device}-{args.dtype} | {facts['threads']} | pp{r['pp_tokens']}{at} | "
                  f"{r['pp_tps']:.2f} |")
        if "tg_tps" in r:
            print(f"| {name} | ds4py-{args.device}-{args.dtype} | {facts['threads']} | tg{r['tg_tokens']}{at} | "
                  f"{r['tg_tps']:.2f} |")
    print(f"\npeak RSS {facts['peak_rss_bytes'] / 2**30:.2f} GiB, load {load_s:.1f} s, "
          f"{facts['memory_mode']}, weights {facts['weight_kinds']}, CPU kernels {facts['cpu_kernels']}")
    if "expert_cache" in facts:
        c = facts["expert_cache"]
        print(f"expert cache: hit rate {c['hit_rate']:.3f}, {c['bytes_read'] / 2**20:.0f} MiB read, "
              f"{c['bytes_read_per_token'] / 2**20:.2f} MiB per token")
        if c["prefetched"]:
            print(f"read-ahead: {c['prefetched']} experts prefetched, {c['prefetch_hits']} of them used "
                  f"({c['prefetch_hit_rate']:.3f})")
    if "layer_stream" in facts:
        c = facts["layer_stream"]
        print(f"layer stream: {c['misses']} layer builds, {c['bytes_read'] / 2**20:.0f} MiB read, "
              f"{c['bytes_read_per_token'] / 2**20:.2f} MiB per token")
    return 0
