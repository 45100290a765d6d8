"""The nano model's tokenizer: a byte-level BPE of 8192 tokens trained on the training split, with the
V4 tokenizer's pre-tokenizer, decoder and post-processor, and the V4 added tokens that are not
placeholders (66: BOS 0, EOS 1, pad 2, <｜User｜>, <｜Assistant｜>, <think>, </think>, ｜DSML｜, ...), in
V4's order and with V4's special flags, so the chat encoding applies unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from ds4py.tokenizer import default_tokenizer_dir

VOCAB = 8192


def v4_added_tokens() -> list[dict]:
    reference = json.loads((default_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    return [a for a in reference["added_tokens"] if "holder" not in a["content"]]


def train(texts: list[str], out_dir: Path) -> Tokenizer:
    reference = json.loads((default_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    added = v4_added_tokens()
    strip = re.compile("|".join(re.escape(a["content"]) for a in added))
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    spec = json.loads(tok.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        spec[key] = reference[key]
    tok = Tokenizer.from_str(json.dumps(spec))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=[a["content"] for a in added],
                                  initial_alphabet=ByteLevel.alphabet())
    tok.train_from_iterator((strip.sub("\n", t) for t in texts), trainer=trainer)
    spec = json.loads(tok.to_str())
    flags = {a["content"]: a["special"] for a in added}
    for a in spec["added_tokens"]:
        a["special"] = flags[a["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((default_tokenizer_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 4096
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    return tok
