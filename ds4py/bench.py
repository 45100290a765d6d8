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


def measure_speculative(model, gen_tokens: int, depth: int, repeats: int) -> dict:
    """Median decode speed with the MTP block's guesses (`ds4py.speculative`) after a prompt of `depth` + 1 tokens,
    the first token (the prompt's) not timed; the acceptance, and the mean time of the two-token calls that check a
    guess and of the MTP block's calls that make one."""
    from ds4py.speculative import SpeculativeStats, speculative_decode

    tps, stats = [], SpeculativeStats()
    for r in range(repeats + 1):  # the first run warms up (the two-token calls' plans), not counted
        run = SpeculativeStats()
        steps = speculative_decode(model, random_ids(depth + 1, model.config.vocab_size, seed=20 + r),
                                   gen_tokens + 1, set(), run)
        next(steps)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        if r:
            tps.append(n / (time.perf_counter() - t0))
            for k in ("steps", "accepted", "main_seconds", "mtp_seconds"):
                setattr(stats, k, getattr(stats, k) + getattr(run, k))
    steps = max(stats.steps, 1)
    t = model.transformer
    head = []
    for rows in (1, 2):  # the output head alone, to tell its share of each call from the layers'
        h = torch.randn(rows, model.config.hidden_size, generator=torch.Generator().manual_seed(rows)).to(t.dtype)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            t.logits(h)
            times.append(time.perf_counter() - t0)
        head.append(statistics.median(times))
    return {"spec_tg_tps": statistics.median(tps), "spec_tg_all": tps, "spec_acceptance": stats.acceptance,
            "spec_check_seconds": stats.main_seconds / steps, "spec_guess_seconds": stats.mtp_seconds / steps,
            "head_seconds": head}


def speculative_costs(one: float, check: float, guess: float) -> str:
    """The acceptance above which guessing pays (a step, one two-token call and one guess, yields 1 + acceptance
    tokens against one token a plain call) and the speed-up at 0.8 acceptance (DeepSeek reports 85-90% for V3's
    second token)."""
    return (f"one-token call {one * 1e3:.1f} ms, two-token check {check * 1e3:.1f} ms ({check / one:.2f}x), MTP guess "
            f"{guess * 1e3:.1f} ms ({guess / one:.2f}x): pays above acceptance {(check + guess) / one - 1:.2f}, "
            f"{1.8 * one / (check + guess):.2f}x plain decoding at 0.8")


def speculative_summary(r: dict, layers: int, real_layers: int = 43) -> str:
    """The measured costs, then the same with the layers' share (each call less the output head's, timed alone)
    scaled to V4 Flash's 43 layers: a few-layer model's calls are mostly its head."""
    one, check, guess = 1 / r["tg_tps"], r["spec_check_seconds"], r["spec_guess_seconds"]
    h1, h2 = r["head_seconds"]
    k = real_layers / layers
    scaled = speculative_costs(h1 + k * (one - h1), h2 + k * (check - h2), guess)  # the guess: one block + head
    return (f"speculative @ d{r['depth']}: {r['spec_tg_tps']:.2f} t/s at acceptance {r['spec_acceptance']:.2f}; "
            f"{speculative_costs(one, check, guess)}\n  head alone {h1 * 1e3:.1f} ms (1 row), {h2 * 1e3:.1f} ms "
            f"(2 rows); the layers scaled to {real_layers}: {scaled}")


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
    if getattr(args, "speculative", False) and args.gen_tokens:
        for r in rows:
            r.update(measure_speculative(model, args.gen_tokens, r["depth"], args.repeats))
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
        if "spec_tg_tps" in r:
            print(f"| {name} | ds4py-{args.device}-{args.dtype} mtp | {facts['threads']} | tg{r['tg_tokens']}{at} | "
                  f"{r['spec_tg_tps']:.2f} |")
    print(f"\npeak RSS {facts['peak_rss_bytes'] / 2**30:.2f} GiB, load {load_s:.1f} s, "
          f"{facts['memory_mode']}, weights {facts['weight_kinds']}, CPU kernels {facts['cpu_kernels']}")
    for r in rows:
        if "spec_tg_tps" in r:
            print(speculative_summary(r, model.config.num_hidden_layers))
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
