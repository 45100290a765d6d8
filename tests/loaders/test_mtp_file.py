"""The MTP block from a file of its own, laid out as llama.cpp's MTP export writes it (conversion/deepseek.py,
`mtp_only`: block_count n + 1 with nextn_predict_layers 1, the block at blk.n with nextn.eh_proj = [e_proj | h_proj],
its hc head as the root output_hc_*, no main layer), added to a main GGUF that lacks it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

import ds4py
from ds4py.config import tiny_config
from ds4py.convert import convert
from ds4py.errors import ModelFormatError
from ds4py.loaders.gguf_names import ARCH, MTP_EXTRA, config_to_metadata, to_gguf_name
from ds4py.loaders.official import save_official
from ds4py.loaders.open import open_weights
from ds4py.model.init import random_weights

CONFIG = tiny_config()


def write_llama_mtp_file(full: str, out: str, config) -> None:
    """llama.cpp's MTP file from a GGUF holding the block under its official names (ds4py convert --mtp)."""
    n = config.num_hidden_layers
    tensors = {t.name: t for t in GGUFReader(full).tensors}
    w = GGUFWriter(out, ARCH)
    for key, value, kind in config_to_metadata(replace(config, num_hidden_layers=n + 1)):
        add = {"u32": w.add_uint32, "f32": w.add_float32, "bool": w.add_bool, "str": w.add_string}.get(kind)
        add(key, value) if add else w.add_array(key, list(value))
    w.add_uint32(f"{ARCH}.nextn_predict_layers", 1)

    def add(name, t, data=None):
        data = t.data if data is None else data
        if t.tensor_type.name in ("F32", "I32"):
            w.add_tensor(name, np.ascontiguousarray(data))
        else:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)

    for name in ("token_embd.weight", "output.weight", "output_norm.weight"):
        add(name, tensors[name])
    for name, t in tensors.items():
        if not name.startswith("mtp.0.") or name.endswith("h_proj.weight") and not name.endswith("eh_proj.weight"):
            continue
        rest = name.removeprefix("mtp.0.")
        if rest.startswith("hc_head_"):
            add(to_gguf_name(rest), t)  # the root hc head is the MTP block's in this file
        elif rest in MTP_EXTRA:
            add(f"blk.{n}.{MTP_EXTRA[rest]}", t)
        elif rest == "e_proj.weight":
            h = tensors["mtp.0.h_proj.weight"]
            add(f"blk.{n}.nextn.eh_proj.weight", t, np.concatenate([t.data, h.data], axis=1))
        else:
            add(to_gguf_name(f"layers.{n}.{rest}"), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    official = save_official(random_weights(CONFIG, seed=3), CONFIG, d / "tiny", 150_000)
    main = convert(official, d / "main.gguf", progress=False)
    full = convert(official, d / "full.gguf", progress=False, mtp=True)
    sidecar = d / "mtp-tiny.gguf"
    write_llama_mtp_file(str(full), str(sidecar), CONFIG)
    return main, full, sidecar


def test_llama_mtp_file_reads_as_the_block(files):
    main, full, sidecar = files
    src = open_weights(sidecar)
    assert src.metadata["mtp_only"] and src.config.num_hidden_layers == CONFIG.num_hidden_layers
    assert src.config.num_nextn_predict_layers == 1
    want = {n for n in open_weights(full).names() if n.startswith("mtp.0.")}
    assert want <= set(src.names())
    for name in ("mtp.0.hc_head_fn", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.ffn.experts.w1"):
        assert torch.equal(src.get(name).dequantize(), open_weights(full).get(name).dequantize()), name


def test_main_file_with_the_mtp_file_decodes_as_the_file_with_both(files):
    main, full, sidecar = files
    assert ds4py.load(main).transformer.mtp is None
    model, both = ds4py.load(main, mtp=str(sidecar)), ds4py.load(full)
    ids = torch.randint(0, CONFIG.vocab_size, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        outs = []
        for m in (model, both):
            t = m.transformer
            streams = t.forward_streams(torch.tensor(ids[:-1]), m.new_cache())
            outs.append(t.logits(t.mtp_forward(streams, torch.tensor(ids[1:]), 0, t.new_mtp_cache())))
    assert torch.equal(outs[0], outs[1])
    prompt = ids[:60]
    assert model.generate(prompt, 16, stop_token_ids=set(), speculative=True) == both.generate(
        prompt, 16, stop_token_ids=set(), speculative=True)


def test_wrong_mtp_file_is_refused(files, tmp_path):
    main, full, sidecar = files
    with pytest.raises(ModelFormatError, match="holds no MTP block"):
        ds4py.load(full, mtp=str(main))
    other = tiny_config(hidden_size=96)
    official = save_official(random_weights(other, seed=1), other, tmp_path / "other", 150_000)
    with pytest.raises(ModelFormatError, match="hidden_size 96 against 64"):
        ds4py.load(main, mtp=str(convert(official, tmp_path / "other.gguf", progress=False, mtp=True)))


def test_inspect_says_what_holds_the_block(files, capsys):
    from ds4py.cli import main as cli

    main, full, sidecar = files
    said = {}
    for name, path in (("sidecar", sidecar), ("full", full), ("main", main)):
        assert cli(["inspect", str(path)]) == 0
        said[name] = capsys.readouterr().out.strip().splitlines()[-1]
    assert said["sidecar"].startswith("OK: DeepSeek V4's MTP block alone")
    assert said["full"] == "OK: a complete DeepSeek V4 model, with its MTP block (for --speculative)"
    assert said["main"] == "OK: a complete DeepSeek V4 model"
