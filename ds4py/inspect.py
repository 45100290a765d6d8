"""`ds4py inspect`: what a GGUF file or checkpoint directory holds, and whether it is a complete
DeepSeek V4 model (every tensor present with the shape its config asks for)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ds4py.errors import Ds4pyError


@dataclass
class TensorRow:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Report:
    path: Path
    kind: str
    metadata: dict
    tensors: list[TensorRow]
    problems: list[str] = field(default_factory=list)
    holds: str = "a complete DeepSeek V4 model"  # what the file is, once read

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def short(value) -> str:
    if isinstance(value, list):
        head = ", ".join(map(str, value[:8]))
        return f"[{head}{', ...' if len(value) > 8 else ''}] ({len(value)} items)"
    text = str(value)
    return text if len(text) <= 80 else text[:77].replace("\n", " ") + "..."


def inspect_path(path: str | Path) -> Report:
    from ds4py.loaders.open import open_weights

    p = Path(path)
    if not p.exists():
        raise Ds4pyError(f"{p}: no such file or directory")
    if p.is_file():
        from ds4py.loaders.gguf_file import GGUFFile

        f = GGUFFile(p)
        md = f.metadata
        rows = [TensorRow(t.name, t.qtype.name, t.shape, t.nbytes) for t in f.tensors.values()]
        report = Report(p, "gguf", md, rows)
    else:
        import json

        from ds4py.loaders.safetensors_files import SafetensorsDir

        md = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
        files = SafetensorsDir(p)
        rows = [TensorRow(n, files.dtype(n), files.shape(n), files.nbytes(n)) for n in files.names()]
        report = Report(p, "checkpoint", md, rows)
    try:
        source = open_weights(p)
    except Ds4pyError as e:
        report.problems.append(str(e))
        return report
    if source.metadata.get("mtp_only"):
        report.holds = "DeepSeek V4's MTP block alone (llama.cpp's MTP file: give it with --mtp-file)"
    elif any(n.startswith("mtp.0.") for n in source.names()):
        report.holds += ", with its MTP block (for --speculative)"
    return report


def inspect_main(args) -> int:
    report = inspect_path(args.path)
    out = sys.stdout
    size = report.total_bytes / 2**30
    print(f"{report.path}: {report.kind}, {len(report.tensors)} tensors, {size:.3f} GiB", file=out)
    for key, value in report.metadata.items():
        if key.startswith("tokenizer.ggml.") and isinstance(value, list):
            value = f"({len(value)} items)"
        print(f"  {key} = {short(value)}", file=out)
    if args.tensors:
        print(f"\n{'name':<48} {'type':<8} {'shape':<24} {'bytes':>12}", file=out)
        for t in report.tensors:
            print(f"{t.name:<48} {t.type:<8} {str(list(t.shape)):<24} {t.nbytes:>12}", file=out)
    if report.problems:
        print("\nINVALID: " + "\n".join(report.problems), file=out)
        return 1
    print(f"\nOK: {report.holds}", file=out)
    return 0
