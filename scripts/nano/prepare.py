"""Step 1 of the nano model: fetch the books, generate the dialogues and stories, train the tokenizer,
and write the token streams (train, held-out books, held-out dialogues) as int32 tensors.

    python scripts/nano/prepare.py WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bpe  # noqa: E402
import corpus  # noqa: E402
import dialogues  # noqa: E402

SEED_TRAIN, SEED_HELD = 1, 2
DIALOGUES, STORIES = 25000, 4000


def stream(tok, docs: list[str]) -> torch.Tensor:
    """Documents concatenated; plain text gets BOS ... EOS, chat text carries its own."""
    added = bpe.v4_added_tokens()
    bos, eos = tok.token_to_id(added[0]["content"]), tok.token_to_id(added[1]["content"])
    ids: list[int] = []
    for d in docs:
        enc = tok.encode(d, add_special_tokens=False).ids
        ids += enc if d.startswith("<｜begin▁of▁sentence｜>") else [bos, *enc, eos]
    return torch.tensor(ids, dtype=torch.int32)


def main(work: Path) -> None:
    cache = work / "cache"
    books_train, books_held = corpus.split(cache)
    files = [n for n, _ in corpus.addresses(cache)]
    gen_train = dialogues.generate(SEED_TRAIN, DIALOGUES, STORIES, files)
    seen = set(gen_train)
    gen_held = [d for d in dialogues.generate(SEED_HELD, 600, 0, files) if d not in seen][:400]
    tok = bpe.train(books_train + gen_train, work / "tokenizer")
    streams = {"train": stream(tok, books_train + gen_train), "held_books": stream(tok, books_held),
               "held_dialogues": stream(tok, gen_held)}
    torch.save(streams, work / "tokens.pt")
    (work / "held_dialogues.json").write_text(json.dumps(gen_held[:50], ensure_ascii=False, indent=0))
    print(json.dumps({k: v.numel() for k, v in streams.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
