"""Read a `deepseek4` GGUF (llama.cpp's converter or antirez/ds4's writers): metadata -> ModelConfig,
tensors -> GGMLWeight over the memory map (nothing is copied until used)."""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from ds4py.errors import ModelFormatError
from ds4py.formats import Dense, Weight
from ds4py.formats.ggml import FLOAT_VIEWS, GGMLWeight
from ds4py.loaders import WeightSource
from ds4py.loaders.gguf_file import GGUFFile, TensorInfo
from ds4py.loaders.gguf_names import ARCH, from_gguf_names, metadata_to_config
from ds4py.loaders.names import expected_shapes

Q = GGMLQuantizationType


def open_gguf(path: str | Path) -> WeightSource:
    path = Path(path)
    f = GGUFFile(path)
    md = f.metadata
    arch = md.get("general.architecture")
    if arch != ARCH:
        raise ModelFormatError(
            f"{path}: a GGUF for architecture {arch!r}, not {ARCH!r}: ds4py runs DeepSeek V4 files only"
        )
    tensors = f.tensors
    vocab = len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md else None
    if vocab is None:
        embd = tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFormatError(f"{path}: no token_embd.weight tensor; the file is incomplete")
        vocab = int(embd.shape[0])
    config = metadata_to_config(md, vocab, str(path))
    names = from_gguf_names(list(tensors), config)
    # llama.cpp's MTP file: no main layer, and the root hc head is the MTP block's
    mtp_only = config.num_nextn_predict_layers > 0 and "blk.0.attn_norm.weight" not in tensors
    if mtp_only:
        for part in ("fn", "base", "scale"):
            if f"hc_head_{part}" in names:
                names[f"mtp.0.hc_head_{part}"] = names.pop(f"hc_head_{part}")
    has_mtp = any(n.startswith("mtp.") for n in names)
    shapes = expected_shapes(config, mtp=has_mtp)
    loaders, readers, tensor_readers, nbytes, kinds, problems = {}, {}, {}, {}, {}, []

    def weight(t: TensorInfo, shape: tuple[int, ...]) -> Weight:
        f.read_ahead(t)  # a weight kept on the map: read in the background, not fault by fault
        data = torch.from_numpy(f.data(t))
        qtype = t.qtype
        if qtype in FLOAT_VIEWS:  # F32, F16, BF16, I32: a view of the map, no copy
            return Dense(data.view(FLOAT_VIEWS[qtype]).reshape(shape))
        return GGMLWeight(qtype, data, shape)

    for name, g in names.items():
        t = tensors[g]
        got = t.shape
        if name.endswith("eh_proj.weight"):  # llama.cpp's MTP export: [e_proj | h_proj] on the input axis
            stem = name.removesuffix("eh_proj.weight")
            half = got[1] // 2
            for part, sl in (("e_proj.weight", slice(0, half)), ("h_proj.weight", slice(half, None))):
                loaders[stem + part] = lambda t=t, got=got, sl=sl: split_columns(weight(t, got), sl)
            continue
        if name not in shapes:
            continue  # a tensor ds4py does not use (e.g. the vision routing bias exp_probs_b_vl)
        if got != shapes[name]:
            problems.append(f"{g} has shape {list(got)}, expected {list(shapes[name])}")
            continue
        loaders[name] = lambda t=t, shape=shapes[name]: weight(t, shape)
        nbytes[name] = t.nbytes
        kinds[name] = t.qtype.name.lower()
        tensor_readers[name] = tensor_reader(path, t, shapes[name])
        if ".ffn.experts." in name and name.startswith("layers."):
            readers[name] = expert_reader(path, t, shapes[name])
    missing = [n for n in shapes if n not in loaders and n.startswith("mtp.0.") == mtp_only
               and (mtp_only or not n.startswith("mtp."))]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), first {missing[0]} ({names_hint(missing[0])})")
    if problems:
        what = "an MTP file" if mtp_only else "a complete deepseek4 GGUF"
        raise ModelFormatError(f"{path}: not {what}: {'; '.join(problems[:3])}")
    return WeightSource(path=path, config=config, loaders=loaders,
                        metadata={**md, "tensor_nbytes": nbytes, "tensor_kinds": kinds, "mtp_only": mtp_only},
                        kind="gguf", expert_readers=readers, tensor_readers=tensor_readers)


def names_hint(name: str) -> str:
    from ds4py.loaders.gguf_names import to_gguf_name

    try:
        return f"GGUF name {to_gguf_name(name)}"
    except ModelFormatError:
        return "no GGUF name"


def split_columns(w: Weight, cols: slice) -> Weight:
    if isinstance(w, GGMLWeight):
        n = w.shape[-1]
        bpr = w.raw.shape[-1]
        start = 0 if cols.start is None else cols.start
        stop = n if cols.stop is None else cols.stop
        raw = w.raw[..., start * bpr // n: stop * bpr // n]
        return GGMLWeight(w.qtype, raw.contiguous(), (*w.shape[:-1], stop - start))
    return Dense(w.dequantize()[..., cols].contiguous())


class MappingPool:
    """Anonymous mappings for streamed experts, reused once no tensor refers to them any more.

    Expert buffers come and go with the expert cache. From malloc, small allocations in between split
    the freed ones and the heap grows: on the 6-layer flash-slice under a 6G budget peak RSS reached
    6.64 GiB. A mapping of its own per read, unmapped on eviction, keeps the RSS to what is live, but is
    zero-filled page by page on every read (pp64 34 -> 10 tok/s on the 3-layer flash-slice). Reusing
    the mappings does both: a mapping is free when only this pool holds it (a tensor made by
    torch.frombuffer holds a reference to its buffer until its storage dies), so at most as many exist
    as were ever live at once plus the free ones of other sizes."""

    def __init__(self):
        self.maps: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> mmap.mmap:
        with self.lock:
            for m in self.maps:
                # references: the list, the loop variable, getrefcount's argument
                if len(m) == nbytes and sys.getrefcount(m) == 3:
                    return m
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            self.maps.append(m)
            for free in [f for f in self.maps if len(f) != nbytes and sys.getrefcount(f) == 3]:
                self.maps.remove(free)  # a size no longer read: give it back
                free.close()
            return m


EXPERT_BUFFERS = MappingPool()
HUGE_READ = 256 << 20  # reads of at least this many bytes go to a mapping of their own, with huge pages


def pread_weight(path: Path, offset: int, nbytes: int, qtype: Q, shape: tuple[int, ...],
                 pooled: bool = False) -> Weight:
    """`nbytes` at `offset` of the file read with pread into a buffer of its own, as a Weight of `shape`:
    the memory map is not touched, so dropping the weight gives the memory back. `pooled` (experts):
    the buffer is a mapping from `EXPERT_BUFFERS`, reused once the weight is dropped."""
    if pooled:
        raw = torch.frombuffer(EXPERT_BUFFERS.take(nbytes), dtype=torch.uint8)
    elif nbytes >= HUGE_READ and hasattr(mmap, "MADV_HUGEPAGE"):
        # a whole expert stack (1.1 GB in V4 Flash): transparent huge pages fault it in 512 times less often
        # (fresh 4 KB pages took 0.35-0.58 s per GB here, as long as repacking it)
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(m, dtype=torch.uint8)
    else:
        raw = torch.empty(nbytes, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = os.preadv(fd, [raw.numpy()], offset)
    finally:
        os.close(fd)
    if got != nbytes:
        raise ModelFormatError(f"{path}: short read at offset {offset}; the file changed or is damaged")
    if qtype in FLOAT_VIEWS:
        return Dense(raw.view(FLOAT_VIEWS[qtype]).reshape(shape))
    return GGMLWeight(qtype, raw, shape)


def tensor_reader(path: Path, t: TensorInfo, shape: tuple[int, ...]):
    """read() -> the whole tensor, read with pread (for streaming layers)."""
    return lambda: pread_weight(path, t.offset, t.nbytes, t.qtype, shape)


def expert_reader(path: Path, t: TensorInfo, shape: tuple[int, ...]):
    """read(e) -> expert e's 2-D weight, read with pread (the memory map is not touched)."""
    per_expert = t.nbytes // shape[0]
    return lambda e: pread_weight(path, t.offset + e * per_expert, per_expert, t.qtype, shape[1:], pooled=True)
