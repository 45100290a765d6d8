"""A Hugging Face tokenizer.json (+ tokenizer_config.json) as the `tokenizer.*` GGUF metadata that
llama.cpp's converter writes for DeepSeek V4 (gpt2-style BPE), and back."""

from __future__ import annotations

import json
from pathlib import Path

NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
V4_PRE = "joyai-llm"  # the pre-tokenizer name llama.cpp's converter detects for the V4 tokenizer


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp marks as control even when tokenizer.json does not call them special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _token_id(config: dict, key: str, vocab: dict[str, int]) -> int | None:
    tok = config.get(key)
    if isinstance(tok, dict):
        tok = tok.get("content")
    return vocab.get(tok) if tok is not None else None


def gguf_tokenizer_metadata(model_dir: Path, vocab_size: int) -> list[tuple[str, object, str]]:
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") or looks_special(by_id[i]) else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    items: list[tuple[str, object, str]] = [
        ("tokenizer.ggml.model", "gpt2", "str"),
        ("tokenizer.ggml.pre", V4_PRE, "str"),
        ("tokenizer.ggml.tokens", tokens, "str[]"),
        ("tokenizer.ggml.token_type", types, "i32[]"),
        ("tokenizer.ggml.merges", merges, "str[]"),
    ]
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        tid = _token_id(cfg, key, vocab)
        if tid is not None:
            items.append((f"tokenizer.ggml.{name}_token_id", tid, "u32"))
    items.append(("tokenizer.ggml.add_bos_token", bool(cfg.get("add_bos_token", False)), "bool"))
    items.append(("tokenizer.ggml.add_eos_token", bool(cfg.get("add_eos_token", False)), "bool"))
    return items
