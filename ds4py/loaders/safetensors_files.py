"""Sharded safetensors directories: find the shards, check them against the index and their own
headers (a truncated download is caught before any tensor is read), and read tensors lazily."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ds4py.errors import ModelFormatError

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "F8_E8M0": torch.uint8, "F4": torch.uint8}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked against the file's size, and where data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path}: not a safetensors file (only {size} bytes); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelFormatError(f"{path}: truncated (header says {n} bytes, file has {size}); download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFormatError(f"{path}: corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelFormatError(
            f"{path}: truncated: its tensors need {8 + n + end} bytes but the file has {size}; download it again"
        )
    return header, 8 + n


class SafetensorsDir:
    """All tensors of a directory's shards: name -> (file, header entry). Tensors are read with plain
    positioned reads into fresh memory, not through a memory map that would stay resident (and count in
    RSS) after the tensor is dropped: converting or streaming a model larger than RAM needs that."""

    def __init__(self, root: Path):
        self.root = root
        index_path = root / "model.safetensors.index.json"
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelFormatError(f"{index_path}: not a valid index ({e}); download it again") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (root / f).exists()]
            if missing:
                raise ModelFormatError(
                    f"{root}: {len(missing)} shard(s) listed in model.safetensors.index.json are missing, "
                    f"first {missing[0]}: download them"
                )
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            if not files:
                raise ModelFormatError(f"{root}: no *.safetensors files found")
        read = {f: read_header(root / f) for f in files}
        self.headers = {f: h for f, (h, _) in read.items()}
        self.data_start = {f: start for f, (_, start) in read.items()}
        self.where: dict[str, str] = {}
        for f, header in self.headers.items():
            for name in header:
                self.where[name] = f
        if index_path.exists():
            absent = [n for n, f in weight_map.items() if n not in self.headers.get(f, {})]
            if absent:
                raise ModelFormatError(
                    f"{root}: the index lists {len(absent)} tensor(s) its shards do not hold, first {absent[0]} "
                    f"(expected in {weight_map[absent[0]]}): that shard is incomplete; download it again"
                )

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.where[name]][name]["shape"])

    def dtype(self, name: str) -> str:
        return self.headers[self.where[name]][name]["dtype"]

    def nbytes(self, name: str) -> int:
        start, end = self.headers[self.where[name]][name]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        info = self.headers[f][name]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        fd = os.open(self.root / f, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], self.data_start[f] + start)
        finally:
            os.close(fd)
        if got != end - start:
            raise ModelFormatError(f"{self.root / f}: short read of {name}; the file changed or is damaged")
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelFormatError(f"{self.root / f}: {name} has unsupported dtype {info['dtype']}")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])
