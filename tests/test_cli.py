"""End-to-end tests of the `ds4py` command on a tiny generated model that carries the real V4 vocabulary
and tokenizer: `run --temp 0` reproduces `Model.generate`, `perplexity` equals the perplexity computed
here from `Model.logits`, and bad input gets an actionable error and exit status."""

from __future__ import annotations

import math
import re

import pytest
import torch

import ds4py
from ds4py.chat import encode_chat
from ds4py.cli import build_parser, main
from ds4py.synthetic import make_model
from ds4py.tokenizer import load_tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. 深度求索 builds language models; "
    "def f(x):\n    return x * 2  # code\n" * 12
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    make_model(str(path), preset="tiny", seed=3)
    model = ds4py.load(str(path))
    tokenizer = load_tokenizer(str(path), model.source.metadata, model.config)
    return str(path), model, tokenizer


def test_run_greedy_reproduces_generate(tiny, capsys):
    path, model, tokenizer = tiny
    prompt = "Once upon a time"
    assert main(["run", path, "-p", prompt, "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    ids = tokenizer.encode(prompt, add_bos=True)
    new = model.generate(ids, max_new_tokens=12, temperature=0.0)
    body = [t for t in new if t not in tokenizer.eos_ids]
    assert out == prompt + tokenizer.decode(body) + "\n"
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: \d+ tokens, [\d.]+ tok/s", err)


def test_run_chat_reproduces_generate(tiny, capsys):
    path, model, tokenizer = tiny
    assert main(["run", path, "-p", "Hi there", "-n", "6", "--chat"]) == 0
    out, _ = capsys.readouterr()
    ids = tokenizer.encode(encode_chat([{"role": "user", "content": "Hi there"}], thinking=False))
    new = model.generate(ids, max_new_tokens=6)
    assert out == tokenizer.decode([t for t in new if t not in tokenizer.eos_ids]) + "\n"


def test_run_seeded_sampling_is_reproducible(tiny, capsys):
    path, _, _ = tiny
    args = ["run", path, "-p", "abc", "-n", "8", "--temp", "0.9", "--seed", "7"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_perplexity_equals_logits(tiny, tmp_path, capsys):
    path, model, tokenizer = tiny
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    ctx = 64
    assert main(["perplexity", path, "-f", str(f), "--ctx", str(ctx)]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"PPL = ([\d.]+)", out).group(1))

    # independently: llama-perplexity scores the second half of each ctx chunk, first token -> BOS
    tokens = tokenizer.encode(TEXT, add_bos=True)
    nll, n = 0.0, 0
    for i in range(len(tokens) // ctx):
        chunk = [tokenizer.bos_id] + tokens[i * ctx + 1:(i + 1) * ctx]
        logits = model.logits(chunk).double()
        for j in range(ctx // 2, ctx - 1):
            nll -= torch.log_softmax(logits[j], -1)[chunk[j + 1]].item()
            n += 1
    assert printed == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_tokenize(tiny, capsys):
    path, _, tokenizer = tiny
    assert main(["tokenize", path, "Hello, world", "--ids"]) == 0
    assert capsys.readouterr().out.strip() == str(tokenizer.encode("Hello, world"))


def test_prompt_over_context_is_an_error(tiny, capsys):
    path, _, _ = tiny
    assert main(["run", path, "-p", "word " * 40, "-n", "4", "--ctx", "16"]) == 1
    err = capsys.readouterr().err
    assert "do not fit in the context of 16" in err and "--ctx" in err and "Traceback" not in err


def test_missing_model_is_an_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.gguf"), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope.gguf" in err


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "m.gguf", "-p", "x", "--tempp", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --tempp" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "chat", "perplexity", "tokenize", "convert", "inspect", "serve",
                                     "make-model", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert f"usage: ds4py {command}" in capsys.readouterr().out


def test_bench_reports_speeds_and_the_cpu_kernels(tiny, capsys):
    import json

    from ds4py.formats import kernels

    path, _, _ = tiny
    assert main(["bench", path, "-p", "8", "-n", "2", "--repeats", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    row = res["results"][0]
    assert row["pp_tokens"] == 8 and row["pp_tps"] > 0 and row["tg_tokens"] == 2 and row["tg_tps"] > 0
    assert res["facts"]["cpu_kernels"].startswith(kernels.isa() + ", bf16 GEMM ")


def test_make_model_routed_experts(tmp_path, capsys):
    # fewer routed experts of the same shape, as many active per token: the benchmark's flash-slice for engines
    # that hold every weight in bf16
    path = tmp_path / "few.gguf"
    assert main(["make-model", str(path), "--preset", "tiny", "--layers", "2", "--routed-experts", "3"]) == 0
    model = ds4py.load(str(path))
    assert model.config.n_routed_experts == 3 and model.config.num_experts_per_tok == 2
    assert model.source.get("layers.0.ffn.experts.w1").shape[0] == 3
    model.generate([1, 2, 3], max_new_tokens=2, temperature=0.0)
    assert main(["make-model", str(tmp_path / "bad.gguf"), "--preset", "tiny", "--routed-experts", "1"]) == 1
    err = capsys.readouterr().err
    assert "--routed-experts 1" in err and "routes each token to 2 experts" in err
    assert not (tmp_path / "bad.gguf").exists()


def test_run_speculative_prints_the_greedy_text(tiny, tmp_path, capsys):
    """`make-model --mtp` keeps the MTP block; `run --speculative` prints what plain greedy `run` prints, and says
    how many guesses were accepted; sampled, a seed repeats its text; a model without the block is refused with what
    to do."""
    path, _, _ = tiny
    mtp = str(tmp_path / "tiny-mtp.gguf")
    assert main(["make-model", mtp, "--preset", "tiny", "--seed", "3", "--mtp"]) == 0
    capsys.readouterr()
    args = ["run", mtp, "-p", "Once upon a time", "-n", "24", "--temp", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert re.search(r"speculative: \d+ of \d+ MTP guesses accepted", err)
    sampled = args[:-2] + ["--temp", "0.8", "--top-k", "20", "--seed", "5", "--speculative"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first
    assert main(["run", path, "-p", "x", "-n", "4", "--speculative"]) == 1
    out, err = capsys.readouterr()
    assert "MTP block" in err and "--mtp-file" in err and out == ""  # refused before the prompt is echoed
    # the same weights but the block, which another file gives (the same seed: the same model)
    assert main(["run", path, "-p", "Once upon a time", "-n", "24", "--temp", "0", "--mtp-file", mtp,
                 "--speculative"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["bench", mtp, "-p", "0", "-n", "4", "--repeats", "1", "--speculative"]) == 0
    assert re.search(r"pays above acceptance [\d.-]+", capsys.readouterr().out)


def test_chat_speculative_turns_reuse_the_cache(tmp_path, capsys, monkeypatch):
    """`chat --speculative` answers each turn as plain greedy chat does, the second turn continuing the first's
    cache (with its MTP block's state)."""
    import builtins

    mtp = str(tmp_path / "tiny-mtp.gguf")
    assert main(["make-model", mtp, "--preset", "tiny", "--seed", "4", "--mtp"]) == 0
    capsys.readouterr()
    answers = {}
    for flag in ([], ["--speculative"]):
        lines = iter(["Hello there", "And then?"])

        def fake_input(_prompt="", lines=lines):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr(builtins, "input", fake_input)
        assert main(["chat", mtp, "-n", "10", "--temp", "0"] + flag) == 0
        answers[bool(flag)] = capsys.readouterr().out
    assert answers[True] == answers[False] and answers[True].count("\n") >= 2
