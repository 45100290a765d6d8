"""Step 2 of the nano model: train transformers' DeepseekV4ForCausalLM (the reference implementation)
on the prepared token stream, on CPU, with fixed seeds; save it in the transformers layout.

    python scripts/nano/train.py WORKDIR [--steps 1500]

Every 250 steps a checkpoint lands in WORKDIR/ckpt.pt and a rerun resumes from it. The routed layers
keep their experts balanced without an auxiliary loss, as DeepSeek V3/V4 do: after each step the
routing bias of an expert that got more than its share of tokens goes down by 1e-3, the others up.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ds4py.config import ModelConfig


def nano_config() -> ModelConfig:
    """Every V4 feature on, at a size that trains on two CPU cores in about an hour (12.3M parameters)."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=32,
        compress_ratios=[0, 4, 128, 4],
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=2048, index_n_heads=4, index_head_dim=32, index_topk=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=256,
        num_hash_layers=1, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, num_nextn_predict_layers=0,
        bos_token_id=0, eos_token_id=1,
    )


def build(config: ModelConfig, seed: int):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config.to_transformers_dict()))
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if hasattr(gate, "tid2eid"):  # a fixed random token -> experts table, distinct experts per token
            gate.tid2eid.copy_(torch.rand(config.vocab_size, config.n_routed_experts, generator=g)
                               .argsort(dim=-1)[:, : config.num_experts_per_tok])
    return model


class Balancer:
    """Counts tokens per expert in each learned router and nudges e_score_correction_bias after a step."""

    def __init__(self, model, rate: float = 1e-3):
        self.rate, self.routers, self.loads = rate, [], []
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "e_score_correction_bias"):
                self.routers.append(gate)
                self.loads.append(torch.zeros(gate.num_experts))
                gate.register_forward_hook(self.hook(len(self.routers) - 1))

    def hook(self, i):
        def count(_module, _inputs, output):
            self.loads[i] += torch.bincount(output[2].reshape(-1), minlength=self.loads[i].numel()).float()
        return count

    @torch.no_grad()
    def step(self) -> float:
        worst = 0.0
        for gate, load in zip(self.routers, self.loads):
            gate.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
            worst = max(worst, (load.max() / load.mean().clamp(min=1)).item())
            load.zero_()
        return worst


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of `seq` tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(ids.numel() - 1, max_windows * seq), seq):
        x = ids[start: start + seq + 1].long()
        if x.numel() < 2:
            break
        out = model(input_ids=x[None, :-1], labels=x[None, :-1])
        # transformers shifts labels itself: loss over len-1 predictions; score the last token too
        logits = out.logits[0, -1]
        last = torch.nn.functional.cross_entropy(logits[None], x[-1:])
        n = x.numel() - 2
        total += out.loss.item() * n + last.item()
        count += n + 1
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = nano_config()
    tokens = torch.load(args.work / "tokens.pt")
    train = tokens["train"]
    model = build(config, args.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    balancer = Balancer(model)
    g = torch.Generator().manual_seed(args.seed + 2)
    step, ckpt = 0, args.work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    log = open(args.work / "train_log.jsonl", "a")
    t0 = time.time()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train[s: s + args.seq] for s in starts.tolist()]).long()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = balancer.step()
        step += 1
        if step % 10 == 0:
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": round(lr, 6), "grad_norm": round(norm.item(), 3),
                   "max_load_over_mean": round(imbalance, 2), "elapsed_s": round(time.time() - t0, 1)}
            if step % 250 == 0 or step == args.steps:
                rec["held_books_loss"] = round(evaluate(model, tokens["held_books"], args.seq, 16), 4)
                rec["held_dialogues_loss"] = round(evaluate(model, tokens["held_dialogues"], args.seq, 16), 4)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(),
                            "step": step}, ckpt)
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    out = args.work / "hf"
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.work / "tokenizer" / name, out / name)
    print(f"saved {out} after {step} steps, {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
