"""`ds4py serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one loaded model.

    app.py            shared state, API key, request log, llama-server style endpoints
    openai_api.py     /v1/chat/completions, /v1/completions
    responses_api.py  /v1/responses (OpenAI Responses API)
    anthropic_api.py  /v1/messages (Anthropic Messages API)
    scheduler.py      the engine thread interleaving requests; bounded queue
    prefix_cache.py   reuse of the longest cached prompt prefix
    jobs.py           asyncio <-> engine thread bridge
    errors.py         OpenAI / Anthropic error bodies
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from ds4py.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--parallel", type=int, default=4, help="requests generated at once (default: 4)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait beyond those; more get 503")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    p.add_argument("--alias", default=None, help="the model name /v1/models reports (default: the file name)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="tokens generated when a request does not say (default: 4096, capped by the context)")
    p.add_argument("--prefix-cache", default="2G", help="memory for reusable prompt states (default: 2G; 0: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: all cores; leave one for clients on this machine)")
    p.add_argument("--template", default="v4", choices=["v4", "flash-0731"], help="chat template variant")
    p.add_argument("--speculative", action="store_true",
                   help="decode each request with the model's MTP guesses (the same greedy tokens, or sampling's "
                        "distribution), one request at a time instead of batched; needs the MTP block")


def build_state(args, model=None, tokenizer=None, log=sys.stderr):
    from ds4py.cli import load_model, resolve_model_path
    from ds4py.memory.plan import parse_size
    from ds4py.server.app import ServerState
    from ds4py.server.prefix_cache import PrefixCache
    from ds4py.server.scheduler import Scheduler
    from ds4py.tokenizer import load_tokenizer

    path = resolve_model_path(args.model) if model is None else str(args.model or "scripted")
    if model is None:
        model = load_model(args, path)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, model.source.metadata if model.source else {}, model.config)
    budget = parse_size(args.prefix_cache) or 0
    speculative = getattr(args, "speculative", False)
    if speculative and getattr(getattr(model, "transformer", None), "mtp", None) is None:
        from ds4py.errors import Ds4pyError

        raise Ds4pyError(f"--speculative needs the model's MTP block, which {path} does not have: give --mtp-file "
                         "(llama.cpp's mtp-*.gguf), a GGUF converted with --mtp, or serve without --speculative")
    scheduler = Scheduler(model, tokenizer, parallel=args.parallel, max_queue=args.queue,
                          prefix_cache=PrefixCache(max_bytes=budget, max_entries=16 if budget else 0),
                          speculative=speculative)
    name = args.alias or Path(path).name
    return ServerState(model, tokenizer, scheduler, model_name=name, model_path=str(path), api_key=args.api_key,
                       default_max_tokens=args.max_tokens, template_variant=args.template, log=log)


def serve_main(args) -> int:
    import uvicorn

    from ds4py.server.app import create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    state = build_state(args)
    plan = getattr(state.model, "memory_plan", None)
    print(f"ds4py serve: {state.model_path} | ctx {state.model.ctx} | {plan.describe() if plan else 'resident'} | "
          f"{args.parallel} slots, queue {args.queue} | http://{args.host}:{args.port}", file=sys.stderr)
    state.scheduler.start()
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        state.scheduler.stop()
    return 0
