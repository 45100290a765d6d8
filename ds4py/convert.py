"""`ds4py convert`: a DeepSeek V4 checkpoint (official, unquantized, or a GGUF to requantize) -> a GGUF
in llama.cpp's `deepseek4` layout.

What llama.cpp's convert_hf_to_gguf.py writes for V4, by default: FP8 weights dequantized and
requantized to Q8_0, routed experts repacked losslessly from FP4 to MXFP4 (stacked [E, out, in] per
layer), tid2eid as I32, BF16 matrices kept BF16, everything else F32; the same metadata keys, values,
tensor names and tensor order. Tensors stream from the shards to the output one at a time, so peak
memory is a few tensors, not the model. The output is written to OUT.tmp and renamed at the end; any
failure removes it.

An unquantized source (float tensors under the official names, or a BF16 GGUF) is laid out as if it were
the official checkpoint: the tensors the official release stores as FP8 become Q8_0, the routed experts
are quantized to MXFP4 (per 32 values the smallest power-of-two scale that keeps the largest within 6,
then the nearest e2m1 value), BF16 and F32 as the official release stores them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from ds4py.errors import Ds4pyError
from ds4py.formats import Dense, Weight
from ds4py.formats.fp4 import FP4Block, quantize_fp4
from ds4py.formats.ggml import fp4_to_mxfp4, quantize_q8_0, row_bytes
from ds4py.loaders import WeightSource
from ds4py.loaders.gguf_names import ARCH, config_to_metadata, to_gguf_name
from ds4py.loaders.names import expected_shapes, storage

ASSETS = Path(__file__).parent / "assets"
EXPERT = re.compile(r"^(?:layers|mtp)\.(\d+)\.ffn\.experts\.w([123])$")  # the MTP block's too (`mtp`)
TYPES = {"q8_0": Q.Q8_0, "bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32, "mxfp4": Q.MXFP4}


@dataclass
class Planned:
    name: str                # canonical
    gguf_name: str
    qtype: Q
    shape: tuple[int, ...]   # logical, torch order

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * row_bytes(self.qtype, self.shape[-1])


def parse_size(text: str | None) -> int:
    if not text:
        return 0
    from ds4py.memory.plan import parse_size as parse

    return parse(text)


FLOAT_KINDS = ("f32", "bf16", "f16")


def intended_kind(name: str, kind: str, unquantized_source: bool) -> str:
    """How the official checkpoint stores this tensor, as far as the source says: a GGUF's Q8_0 was FP8,
    its MXFP4 was FP4; in an unquantized source every tensor is taken as the official layout stores it."""
    if kind == "q8_0":
        return "fp8"
    if kind == "mxfp4":
        return "fp4"
    if unquantized_source and kind in FLOAT_KINDS:
        return storage(name)
    return kind


def choose_type(name: str, kind: str, shape: tuple[int, ...], type_: str, experts: str) -> Q:
    if name.endswith("tid2eid"):
        return Q.I32
    if EXPERT.match(name):
        if experts == "mxfp4" and kind not in ("fp4", *FLOAT_KINDS):
            raise Ds4pyError(f"{name} is {kind}: MXFP4 experts come from FP4 (a lossless repack) or from float "
                             "weights; use --experts q8_0 or bf16")
        return TYPES[experts]
    if len(shape) < 2:
        return Q.F32
    if kind == "fp8":
        return Q.Q8_0 if type_ == "auto" else TYPES[type_]
    if kind == "bf16":
        return Q.BF16 if type_ in ("auto", "q8_0") else TYPES[type_]
    return Q.F32 if type_ in ("auto", "q8_0") else TYPES[type_]


def plan(source: WeightSource, type_: str, experts: str, mtp: bool = False) -> list[Planned]:
    """Tensors in llama.cpp's order: hash tables, then each layer's experts (gate, down, up), then the rest
    sorted by their source names. With `mtp`, the MTP block too (its experts after the layers'), under its
    official names `mtp.0.*` (antirez/ds4's style)."""
    shapes = expected_shapes(source.config, mtp=mtp)
    names = [n for n in source.names() if n in shapes]
    hashed = [n for n in names if n.endswith("tid2eid")]
    experts_ = sorted((n for n in names if EXPERT.match(n)),
                      key=lambda n: (n.startswith("mtp."), *map(int, EXPERT.match(n).groups())))
    rest = sorted(n for n in names if n not in hashed and n not in experts_)
    kinds = {n: source.metadata.get("tensor_kinds", {}).get(n) or source.get(n).kind for n in names}
    unquantized = all(k in (*FLOAT_KINDS, "i32") for k in kinds.values())
    out = []
    for name in hashed + experts_ + rest:
        kind = intended_kind(name, kinds[name], unquantized)
        qtype = choose_type(name, kind, shapes[name], type_, experts)
        out.append(Planned(name, to_gguf_name(name), qtype, shapes[name]))
    return out


class ChunkedTensor:
    """What GGUFWriter.write_tensor_data needs of an array (nbytes, tofile), produced chunk by chunk so
    a layer's expert stack never sits in memory whole."""

    def __init__(self, nbytes: int, chunks):
        self.nbytes = nbytes
        self.chunks = chunks

    def tofile(self, f) -> None:
        for chunk in self.chunks():
            chunk.tofile(f)


def encode_experts(source: WeightSource, p: Planned) -> ChunkedTensor:
    """A stacked expert tensor written one expert at a time, read with the source's expert reader."""
    read = source.expert_readers[p.name]

    def chunks():
        for e in range(p.shape[0]):
            w = read(e)
            if p.qtype == Q.MXFP4:
                yield to_mxfp4(w).numpy()
            elif p.qtype == Q.Q8_0:
                yield quantize_q8_0(w.dequantize()).numpy()
            else:
                yield w.dequantize(torch.bfloat16).contiguous().view(torch.uint8).numpy()

    return ChunkedTensor(p.nbytes, chunks)


def to_mxfp4(w: Weight) -> torch.Tensor:
    """Raw MXFP4 of a weight: a repack of FP4, else quantized from its float values."""
    if isinstance(w, FP4Block):
        return fp4_to_mxfp4(w.packed, w.scale)
    return fp4_to_mxfp4(*quantize_fp4(w.dequantize(torch.float32)))


def encode(w: Weight, p: Planned) -> np.ndarray:
    """The bytes of one tensor in its GGUF type, as a numpy array the writer takes."""
    if p.qtype == Q.MXFP4:
        return to_mxfp4(w).numpy()
    if p.qtype == Q.I32:
        return w.dequantize(torch.int32).numpy() if not isinstance(w, Dense) else w.tensor.to(torch.int32).numpy()
    if p.qtype == Q.F32:
        return w.dequantize(torch.float32).numpy()
    if p.qtype == Q.F16:
        return w.dequantize(torch.float32).to(torch.float16).numpy()
    if p.qtype == Q.BF16:
        t = w.tensor if isinstance(w, Dense) and w.tensor.dtype == torch.bfloat16 else w.dequantize(torch.bfloat16)
        return t.contiguous().view(torch.uint8).numpy()
    if p.qtype == Q.Q8_0:
        if EXPERT.match(p.name):  # one expert at a time keeps the float copy small
            return np.stack([quantize_q8_0(w.expert(e).dequantize()).numpy() for e in range(p.shape[0])])
        return quantize_q8_0(w.dequantize()).numpy()
    raise Ds4pyError(f"cannot write {p.name} as {p.qtype.name}")


def size_label(tensors: list[Planned]) -> str:
    """llama.cpp's size label ("256x13B"): shared parameters plus one expert's, times the expert count."""
    import gguf

    shared = expert = expert_sum = n_expert_tensors = total = 0
    for p in tensors:
        n = int(np.prod(p.shape))
        total += n
        if EXPERT.match(p.name):
            expert += n // p.shape[0]
            expert_sum += p.shape[0]
            n_expert_tensors += 1
        else:
            shared += n
    count = expert_sum // n_expert_tensors if n_expert_tensors else 0
    return gguf.size_label(total, shared, expert, count)


TOKENIZER_KEY_TYPES = {"tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.chat_template": "str",
                       "tokenizer.ggml.add_bos_token": "bool", "tokenizer.ggml.add_eos_token": "bool"}


def tokenizer_items(source: WeightSource, tok_dir: Path) -> list[tuple[str, object, str]]:
    """The tokenizer metadata: copied from a source GGUF, or from tokenizer.json in `tok_dir`."""
    from ds4py.tokenizer_gguf import gguf_tokenizer_metadata

    if source.kind == "gguf":
        return [(k, v, TOKENIZER_KEY_TYPES.get(k, "u32" if k.endswith("_id") else "array"))
                for k, v in source.metadata.items() if k.startswith("tokenizer.ggml.")]
    if (tok_dir / "tokenizer.json").exists():
        return gguf_tokenizer_metadata(tok_dir, source.config.vocab_size)
    print(f"convert: no tokenizer.json in {tok_dir}: the GGUF gets no tokenizer metadata", file=sys.stderr)
    return []


def metadata(writer: GGUFWriter, source: WeightSource, name: str, tensors: list[Planned]) -> None:
    tok_dir = source.path if source.path.is_dir() else source.path.parent
    kept = source.metadata if source.kind == "gguf" else {}  # a requantized GGUF keeps its template and name
    writer.add_chat_template(kept.get("tokenizer.chat_template") or chat_template(tok_dir))
    writer.add_string("general.type", "model")
    writer.add_string("general.name", kept.get("general.name", name))
    writer.add_string("general.size_label", size_label(tensors))
    items = config_to_metadata(source.config)
    items.append(("general.quantization_version", 2, "u32"))
    items += tokenizer_items(source, tok_dir)
    for key, value, kind in items:
        add = {"u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool,
               "str": writer.add_string}.get(kind)
        if add:
            add(key, value)
        else:
            writer.add_array(key, list(value))


def chat_template(model_dir: Path) -> str:
    import json

    cfg = model_dir / "tokenizer_config.json"
    if cfg.exists():
        tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str) and tpl:
            return tpl
    flash_0731 = "0731" in model_dir.name
    variant = "deepseek-ai-DeepSeek-V4-Flash-0731.jinja" if flash_0731 else "deepseek-ai-DeepSeek-V4.jinja"
    return (ASSETS / variant).read_text(encoding="utf-8")


def convert(src: str | Path, out: str | Path, type: str = "auto", experts: str = "mxfp4", force: bool = False,
            shard_size: str | int | None = None, progress: bool = True, mtp: bool = False) -> Path:
    """The official checkpoint (or a GGUF to requantize) at `src` -> a GGUF at `out`. Without `mtp` the MTP block is
    left out, as llama.cpp's conversion leaves it out by default (llama.cpp refuses a file holding tensors it does
    not load); with it, it is kept for ds4py's speculative decoding."""
    from ds4py.loaders.open import open_weights

    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise Ds4pyError(f"{out} already exists: choose another name or pass --force to overwrite it")
    if type not in ("auto", "q8_0", "bf16", "f16", "f32") or experts not in ("mxfp4", "q8_0", "bf16"):
        raise Ds4pyError(f"unknown --type {type!r} or --experts {experts!r}")
    source = open_weights(src)
    if source.kind == "gguf" and src.resolve() == out.resolve():
        raise Ds4pyError(f"{out} is the source GGUF: write the requantized file under another name")
    tensors = plan(source, type, experts, mtp)
    if mtp and not any(p.name.startswith("mtp.") for p in tensors):
        raise Ds4pyError(f"{src} has no MTP block (mtp.0.*) to keep: convert without --mtp")
    total = sum(p.nbytes for p in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total + (1 << 20) > free:
        raise Ds4pyError(f"{out.parent} has {free / 2**30:.1f} GiB free but the GGUF needs {total / 2**30:.1f} GiB: "
                         "free some space or write elsewhere")
    # written into a hidden directory beside the output and moved into place only when complete
    tmp_dir = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    split = parse_size(shard_size)
    writer = GGUFWriter(tmp_dir / out.name, ARCH, split_max_size=split)
    try:
        stem = src.stem if src.is_file() else src.name
        metadata(writer, source, stem.replace("-", " ").replace("_", " ").title(), tensors)
        for p in tensors:
            byte_shape = (*p.shape[:-1], row_bytes(p.qtype, p.shape[-1]))
            if p.qtype in (Q.F32, Q.I32):
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32 if p.qtype == Q.F32 else np.int32),
                                       p.nbytes)
            else:
                writer.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}")
        for p in tensors:
            if EXPERT.match(p.name) and p.name in source.expert_readers:
                data = encode_experts(source, p)
            else:
                data = encode(source.get(p.name), p)
            if data.nbytes != p.nbytes:
                raise Ds4pyError(f"{p.name}: produced {data.nbytes} bytes, expected {p.nbytes}")
            writer.write_tensor_data(data)
            if bar:
                bar.update(p.nbytes)
            del data
        if bar:
            bar.close()
        writer.close()
    except BaseException:
        writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    for f in sorted(tmp_dir.iterdir()):
        os.replace(f, out.parent / f.name)
    tmp_dir.rmdir()
    return out
