"""The `ds4py` command: run, chat, perplexity, tokenize, convert, inspect, serve, make-model, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds4py.errors import Ds4pyError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "nano"


def add_model_arguments(p: argparse.ArgumentParser, optional_model: bool = True) -> None:
    if optional_model:
        p.add_argument("model", nargs="?", default=None,
                       help="model directory or .gguf file (default: the bundled nano model)")
    else:
        p.add_argument("model", help="model directory or .gguf file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="activation and dense-weight dtype (default: float32)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: the model's)")
    p.add_argument("--memory-budget", default=None,
                   help="RAM the weights may use, e.g. 8G; when the model is larger, routed experts are read from "
                        "the file on demand into a cache of what is left, and when even the other weights do not "
                        "fit, layers are read as they run (default: the memory available now)")
    p.add_argument("--mtp-file", default=None,
                   help="the MTP block for --speculative from a file of its own (llama.cpp's mtp-*.gguf)")
    p.add_argument("--read-ahead", default=None, choices=["on", "off", "gate", "previous", "hash"],
                   help="when streaming, read the next layer's likely experts in the background: gate (layer "
                        "L+1's router on layer L's hidden state; on), previous (its last choices) or hash (hash "
                        "layers only) (default: $DS4PY_READ_AHEAD, else off)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        if not Path(model).exists():
            raise Ds4pyError(f"model path {model!r} does not exist: give a model directory or a .gguf file")
        return model
    if not BUNDLED_MODEL.exists():
        raise Ds4pyError("no model given and no bundled model is installed: pass a model directory or .gguf file")
    return str(BUNDLED_MODEL)


def load_model_and_tokenizer(args):
    from ds4py.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    model = load_model(args, path)
    tokenizer = load_tokenizer(path, model.source.metadata, model.config)
    return model, tokenizer


def load_model(args, path: str):
    """ds4py.load with the command's options, saying on stderr which memory mode it chose."""
    import ds4py

    model = ds4py.load(path, device=args.device, dtype=args.dtype, ctx=args.ctx,
                       progress=sys.stderr.isatty(), memory_budget=args.memory_budget,
                       read_ahead=getattr(args, "read_ahead", None), mtp=getattr(args, "mtp_file", None))
    ahead = model.transformer.read_ahead
    note = f", read-ahead {ahead.predictor}" if ahead is not None else ""
    print(f"ds4py: {path}: {model.memory_plan.describe()}{note}", file=sys.stderr)
    return model


def sampling_params(args):
    from ds4py.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens, stop=list(args.stop),
    )


# --- sub-commands --------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from ds4py.generation import generate_text

    model, tokenizer = load_model_and_tokenizer(args)
    if args.chat or args.think:
        from ds4py.chat import encode_chat

        text = encode_chat([{"role": "user", "content": args.prompt}], thinking=args.think)
        prompt_ids = tokenizer.encode(text)
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=True)
    # (made before the prompt is echoed: a prompt over the context or a model without the MTP block is an error)
    result = generate_text(model, tokenizer, prompt_ids, sampling_params(args), speculative=args.speculative)
    if not args.chat and not args.think:
        sys.stdout.write(args.prompt)
    for delta in result:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(result.stats.summary(), file=sys.stderr)
    if result.speculative_stats is not None:
        st = result.speculative_stats
        print(f"speculative: {st.accepted} of {st.steps} MTP guesses accepted ({st.acceptance:.2f})", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from ds4py.chat_repl import chat_loop

    model, tokenizer = load_model_and_tokenizer(args)
    return chat_loop(model, tokenizer, sampling_params(args), thinking=args.think, system=args.system,
                     speculative=args.speculative)


def cmd_perplexity(args) -> int:
    from ds4py.perplexity import perplexity
    from ds4py.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise Ds4pyError(f"cannot read {args.file}: {e.strerror}") from None
    model = load_model(args, path)
    tokenizer = load_tokenizer(path, model.source.metadata, model.config)
    tokens = tokenizer.encode(text, add_bos=True)
    ctx = args.ctx or 512
    print(f"perplexity: {len(tokens)} tokens, {len(tokens) // ctx} chunks of {ctx}", file=sys.stderr)
    result = perplexity(
        model.logits, tokens, ctx, tokenizer.bos_id, max_chunks=args.chunks,
        on_chunk=lambda i, p: print(f"[{i}]{p:.4f},", end="", flush=True),
    )
    print()
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.error:.5f}")
    return 0


def cmd_tokenize(args) -> int:
    from ds4py.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    metadata, config = {}, None
    if path.endswith(".gguf"):
        from ds4py.loaders.open import open_weights

        source = open_weights(path)
        metadata, config = source.metadata, source.config
    tokenizer = load_tokenizer(path, metadata, config)
    ids = tokenizer.encode(args.text, add_bos=args.bos)
    if args.ids:
        print(ids)
    else:
        for i in ids:
            print(f"{i:>7} -> {tokenizer.decode([i])!r}")
    return 0


def cmd_convert(args) -> int:
    from ds4py.convert import convert

    convert(args.src, args.out, type=args.type, experts=args.experts, force=args.force,
            shard_size=args.shard_size, progress=True, mtp=args.mtp)
    return 0


def cmd_inspect(args) -> int:
    from ds4py.inspect import inspect_main

    return inspect_main(args)


def cmd_serve(args) -> int:
    from ds4py.server import serve_main

    return serve_main(args)


def cmd_make_model(args) -> int:
    from ds4py.synthetic import make_model

    make_model(args.out, preset=args.preset, layers=args.layers, fmt=args.format, seed=args.seed, force=args.force,
               routed_experts=args.routed_experts, mtp=args.mtp)
    return 0


def cmd_bench(args) -> int:
    from ds4py.bench import bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds4py", description="DeepSeek V4 Flash inference engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="generate a continuation of a prompt")
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the V4 chat format")
    p.add_argument("--think", action="store_true", help="chat with thinking mode on")
    p.add_argument("--speculative", action="store_true",
                   help="check the model's MTP guesses two tokens a pass (greedy: the same tokens; sampled: the same "
                        "distribution); needs a model with its MTP block")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat in the V4 chat format")
    add_model_arguments(p)
    p.add_argument("--think", action="store_true", help="thinking mode (reasoning shown dimmed)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--speculative", action="store_true",
                   help="check the model's MTP guesses two tokens a pass, as run --speculative")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat, max_tokens=512)

    p = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama-perplexity does")
    add_model_arguments(p)
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("tokenize", help="show how a text tokenizes")
    p.add_argument("model", help="model directory or .gguf file")
    p.add_argument("text")
    p.add_argument("--bos", action="store_true", help="prepend BOS")
    p.add_argument("--ids", action="store_true", help="print only the id list")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("convert", help="official checkpoint -> GGUF (llama.cpp's deepseek4 layout)")
    p.add_argument("src", help="official checkpoint directory (or transformers layout)")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--type", default="auto", choices=["auto", "q8_0", "bf16", "f16", "f32"],
                   help="type of the FP8 weights: auto = Q8_0 as llama.cpp writes (V4 Flash ~155 GB with "
                        "MXFP4 experts); bf16 ~ +8 GB; f32 ~ +25 GB")
    p.add_argument("--experts", default="mxfp4", choices=["mxfp4", "q8_0", "bf16"],
                   help="routed experts: mxfp4 = lossless repack of the FP4 source (~140 GB of V4 Flash's "
                        "~155 GB); q8_0 ~ +130 GB; bf16 ~ +390 GB")
    p.add_argument("--shard-size", default=None, help="split the output into shards of this size, e.g. 50G")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--mtp", action="store_true",
                   help="keep the MTP block (mtp.0.*, for ds4py's --speculative; llama.cpp does not load such a file)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="list and validate a GGUF's or checkpoint's metadata and tensors")
    p.add_argument("path")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    try:
        from ds4py.server import add_serve_arguments

        add_serve_arguments(p)
    except ImportError:
        add_model_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("make-model", help="write a synthetic random-weight model")
    p.add_argument("out")
    p.add_argument("--preset", default="tiny", choices=["tiny", "flash-slice"])
    p.add_argument("--layers", type=int, default=None, help="number of layers (flash-slice default: 3)")
    p.add_argument("--format", default="gguf", choices=["official", "gguf"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routed-experts", type=int, default=None,
                   help="routed experts per MoE layer (default: the preset's; flash-slice 256), same shape and "
                        "as many active per token")
    p.add_argument("--mtp", action="store_true",
                   help="with an MTP block (flash-slice: a random one) kept in the GGUF, for --speculative")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("bench", help="prefill and decode speed (llama-bench style)")
    add_model_arguments(p, optional_model=True)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512)
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("--depths", default="0", help="context depths, comma separated, e.g. 0,4096")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--speculative", action="store_true",
                   help="also decode with the MTP block's guesses: tok/s, acceptance, and each call's cost")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Ds4pyError as e:
        print(f"ds4py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
