"""`open_weights(path)`: pick the reader for a .gguf file, an official checkpoint directory or a
transformers-layout directory."""

from __future__ import annotations

from pathlib import Path

from ds4py.errors import ModelFormatError
from ds4py.loaders import WeightSource


def open_weights(path: str | Path) -> WeightSource:
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory; give a model directory or a .gguf file")
    if p.is_file():
        if p.suffix == ".gguf" or _is_gguf(p):
            from ds4py.loaders.gguf import open_gguf

            return open_gguf(p)
        raise ModelFormatError(f"{p}: not a GGUF file; give a .gguf file or a checkpoint directory")
    if not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            from ds4py.loaders.gguf import open_gguf

            return open_gguf(ggufs[0])
        raise ModelFormatError(f"{p}: no config.json here; a checkpoint directory needs config.json and *.safetensors")
    from ds4py.loaders.safetensors_files import SafetensorsDir

    if any(n.startswith("model.layers.") for n in SafetensorsDir(p).names()):
        from ds4py.loaders.transformers_layout import open_transformers

        return open_transformers(p)
    from ds4py.loaders.official import open_official

    return open_official(p)


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"
