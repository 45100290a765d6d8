"""`ds4py inspect` lists a file's contents and says whether it is a complete V4 model."""

from __future__ import annotations

import json

from ds4py.cli import main
from ds4py.config import tiny_config
from ds4py.convert import convert
from ds4py.loaders.official import save_official
from ds4py.model.init import random_weights


def test_inspect_valid_and_invalid(tmp_path, capsys):
    config = tiny_config()
    ck = save_official(random_weights(config, seed=1), config, tmp_path / "ck")
    gguf = convert(ck, tmp_path / "m.gguf", progress=False)
    assert main(["inspect", str(gguf), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "deepseek4.attention.compress_ratios = [0, 4, 128, 4, 0]" in out
    assert "blk.1.ffn_gate_exps.weight" in out and "MXFP4" in out and "OK: a complete" in out
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    cfg["compress_ratios"] = [0, 4, 128, 4, 0, 0]
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(ck)]) == 1
    assert "INVALID" in capsys.readouterr().out
