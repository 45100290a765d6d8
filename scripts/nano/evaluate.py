"""Step 4 of the nano model: the numbers of its model card and the test fixtures.

Writes the Q8_0 form (what `ds4py convert` makes of the official FP8 tensors, experts Q8_0) and the
MXFP4-experts form (the real GGUF's layout) of the BF16 GGUF, measures held-out perplexity of all three
with ds4py (windows of 512 tokens, BOS first), and writes tests/data/nano/: a held-out excerpt of the books,
held-out dialogues, and the greedy continuations of fixed prompts (the golden tests).

    python scripts/nano/evaluate.py WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import ds4py
from ds4py.convert import convert
from ds4py.perplexity import perplexity
from ds4py.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "ds4py" / "assets" / "nano" / "nano.gguf"
DATA = ROOT / "tests" / "data" / "nano"
CTX = 512
PROMPTS = ["Once upon a time", "Call me Ishmael.", "The President of the United States",
           "Fellow-Citizens of the Senate and House of Representatives:"]
QUESTIONS = ["What is the capital of France?", "What is 3 plus 4?", "Who wrote Moby Dick?", "Hello!"]


def forms(work: Path) -> dict[str, Path]:
    out = {"bf16": NANO}
    for name, type_, experts in (("q8_0", "q8_0", "q8_0"), ("mxfp4", "auto", "mxfp4")):
        path = work / f"nano-{name}.gguf"
        convert(NANO, path, type=type_, experts=experts, force=True, progress=False)
        out[name] = path
    return out


def held_out_text(work: Path) -> tuple[str, list[str]]:
    sys.path.insert(0, str(Path(__file__).parent))
    import corpus

    _, held = corpus.split(work / "cache")
    dialogues = json.loads((work / "held_dialogues.json").read_text(encoding="utf-8"))
    return "\n\n".join(held), dialogues


def main(work: Path) -> None:
    torch.set_num_threads(2)
    books, dialogues = held_out_text(work)
    DATA.mkdir(parents=True, exist_ok=True)
    # the fixture: one held-out chapter and the first held-out address, about 9000 tokens
    (DATA / "heldout_books.txt").write_text(books[:40000], encoding="utf-8")
    (DATA / "heldout_dialogues.json").write_text(json.dumps(dialogues[:40], ensure_ascii=False, indent=0),
                                                 encoding="utf-8")
    card = {}
    for name, path in forms(work).items():
        model = ds4py.load(str(path))
        tok = load_tokenizer(path, model.source.metadata, model.config)
        book_ids = tok.encode(books, add_bos=True)
        dia_ids = [i for d in dialogues for i in tok.encode(d)]
        card[name] = {
            "bytes": path.stat().st_size,
            "ppl_books": round(perplexity(model.logits, book_ids, CTX, tok.bos_id).ppl, 3),
            "ppl_dialogues": round(perplexity(model.logits, dia_ids, CTX, tok.bos_id).ppl, 3),
            "tokens_books": len(book_ids), "tokens_dialogues": len(dia_ids),
        }
        print(name, card[name], flush=True)
    model = ds4py.load(str(NANO))
    tok = load_tokenizer(NANO, model.source.metadata, model.config)
    from ds4py.chat import encode_chat

    golden = []
    for p in PROMPTS:
        ids = model.generate(tok.encode(p, add_bos=True), max_new_tokens=24)
        golden.append({"prompt": p, "chat": False, "ids": ids, "text": tok.decode(ids)})
    for q in QUESTIONS:
        ids = model.generate(tok.encode(encode_chat([{"role": "user", "content": q}])), max_new_tokens=24)
        golden.append({"prompt": q, "chat": True, "ids": ids, "text": tok.decode(ids)})
    for g in golden:
        print(json.dumps({k: g[k] for k in ("prompt", "text")}, ensure_ascii=False))
    (DATA / "golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1), encoding="utf-8")
    (work / "card.json").write_text(json.dumps(card, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
