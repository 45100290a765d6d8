"""A GGUF weight kept on the memory map is advised to the kernel (MADV_WILLNEED) when it is loaded, over its
whole byte range in steps of at most one read-ahead window, so that its pages are read in the background and
not fault by fault (the embedding's rows: one random disk read per new token)."""

from __future__ import annotations

import mmap

import pytest

import ds4py.loaders.gguf_file as gguf_file
from ds4py.loaders.gguf_file import GGUFFile
from ds4py.loaders.open import open_weights
from ds4py.synthetic import make_model

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_WILLNEED"), reason="no madvise on this platform")


class Advised:
    """Stands in for the file's map: records the madvise calls."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []

    def madvise(self, option: int, start: int, length: int) -> None:
        self.calls.append((option, start, length))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    make_model(str(path), preset="tiny", seed=1)
    return path


def test_read_ahead_covers_the_tensor_in_page_aligned_window_steps(tiny_gguf, monkeypatch):
    monkeypatch.setattr(gguf_file, "READ_AHEAD_STEP", 4 * mmap.PAGESIZE)
    f = GGUFFile(tiny_gguf)
    info = max(f.tensors.values(), key=lambda t: t.nbytes)  # several steps long
    assert info.nbytes > 3 * gguf_file.READ_AHEAD_STEP
    f.mm = Advised()
    f.read_ahead(info)
    calls = f.mm.calls
    assert all(option == mmap.MADV_WILLNEED for option, _, _ in calls)
    assert all(start % mmap.PAGESIZE == 0 and 0 < length <= gguf_file.READ_AHEAD_STEP for _, start, length in calls)
    assert calls[0][1] <= info.offset < calls[0][1] + mmap.PAGESIZE
    for (_, a, n), (_, b, _) in zip(calls, calls[1:]):
        assert b == a + n  # contiguous: no page left out
    assert calls[-1][1] + calls[-1][2] == info.offset + info.nbytes


def test_each_weight_loaded_from_the_map_is_read_ahead(tiny_gguf, monkeypatch):
    advised: list[str] = []
    monkeypatch.setattr(GGUFFile, "read_ahead", lambda self, info: advised.append(info.name))
    source = open_weights(tiny_gguf)
    source.get("embed.weight")
    source.get("head.weight")
    assert advised == ["token_embd.weight", "output.weight"]


def test_read_ahead_of_the_real_map_runs(tiny_gguf):
    f = GGUFFile(tiny_gguf)
    for info in f.tensors.values():
        f.read_ahead(info)  # page-aligned, in range: madvise raises otherwise
