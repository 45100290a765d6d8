"""The FastAPI application: shared state, API-key check, request log, and the llama-server style
endpoints (/health, /props, /metrics, /tokenize, /detokenize, /apply-template, /v1/models). The
generation endpoints live in openai_api, responses_api and anthropic_api."""

from __future__ import annotations

import hmac
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

import ds4py
from ds4py.engine import Model
from ds4py.server import anthropic_api, errors, openai_api, responses_api
from ds4py.server.scheduler import Scheduler
from ds4py.tokenizer import Tokenizer


@dataclass
class ServerState:
    model: Model
    tokenizer: Tokenizer
    scheduler: Scheduler
    model_name: str
    model_path: str
    api_key: str | None = None
    default_max_tokens: int = 4096
    template_variant: str = "v4"
    log: Any = sys.stderr
    started: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        return f"ds4py-{ds4py.__version__}"

    def log_request(self, request: Request, n_prompt: int, params) -> None:
        request.state.log_extra = f"prompt={n_prompt} max_tokens={params.max_tokens} temp={params.temperature}"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ds4py", version=ds4py.__version__, docs_url=None, redoc_url=None)
    app.state.ds4py = state
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        if state.api_key and path not in ("/health", "/metrics"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                return errors.error_response(request, 401, "invalid or missing API key: send it as "
                                             "'Authorization: Bearer KEY'", code="invalid_api_key")
        response = await call_next(request)
        extra = getattr(request.state, "log_extra", "")
        client = request.client.host if request.client else "-"
        print(f"{time.strftime('%H:%M:%S')} {client} {request.method} {path} {response.status_code} "
              f"{(time.perf_counter() - t0) * 1000:.0f}ms {extra}".rstrip(), file=state.log, flush=True)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "ds4py"}]}

    @app.get("/props")
    async def props():
        m = state.model
        plan = getattr(m, "memory_plan", None)
        cache = getattr(m, "expert_cache", None)
        layers = getattr(m, "layer_stream", None)
        kinds: dict[str, int] = {}
        for k in (m.source.metadata.get("tensor_kinds") or {}).values() if m.source else []:
            kinds[k] = kinds.get(k, 0) + 1
        return {
            "model_path": state.model_path, "model_alias": state.model_name,
            "architecture": "deepseek4", "n_ctx": m.ctx, "n_ctx_train": m.config.max_position_embeddings,
            "n_vocab": m.config.vocab_size, "n_layers": m.config.num_hidden_layers,
            "quantization": kinds, "device": str(m.transformer.device) if hasattr(m.transformer, "device") else "cpu",
            "memory_mode": plan.describe() if plan else "resident",
            "expert_cache": cache.stats.as_dict() if cache else None,
            "layer_stream": layers.stats.as_dict() if layers else None,
            "prefix_cache": state.scheduler.prefix_cache.stats(),
            "total_slots": state.scheduler.parallel, "queue_limit": state.scheduler.max_queue,
            "chat_template": state.template_variant,
            "default_generation_settings": {"max_tokens": state.default_max_tokens},
            "build_info": f"ds4py {ds4py.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        }

    @app.get("/metrics")
    async def metrics():
        s, c = state.scheduler, state.scheduler.counters
        lines = []

        def metric(name: str, kind: str, help_: str, value, labels: str = ""):
            lines.append(f"# HELP ds4py_{name} {help_}")
            lines.append(f"# TYPE ds4py_{name} {kind}")
            lines.append(f"ds4py_{name}{labels} {value}")

        metric("requests_total", "counter", "generation requests accepted", c.requests)
        metric("requests_finished_total", "counter", "generation requests finished", c.finished)
        metric("requests_cancelled_total", "counter", "requests whose client went away", c.cancelled)
        metric("requests_rejected_total", "counter", "requests refused with 503 (queue full)", c.rejected)
        metric("requests_failed_total", "counter", "requests that failed in the engine", c.failed)
        metric("requests_processing", "gauge", "requests being generated", len(s.active))
        metric("requests_deferred", "gauge", "requests waiting in the queue", s.queue_depth)
        metric("prompt_tokens_total", "counter", "prompt tokens", c.prompt_tokens)
        metric("prompt_tokens_cached_total", "counter", "prompt tokens reused from the prefix cache", c.cached_tokens)
        metric("tokens_predicted_total", "counter", "generated tokens", c.generated_tokens)
        pp = (c.prompt_tokens - c.cached_tokens) / c.prompt_seconds if c.prompt_seconds else 0.0
        tg = c.generated_tokens / c.generation_seconds if c.generation_seconds else 0.0
        metric("prompt_tokens_seconds", "gauge", "average prompt throughput (tokens/s)", f"{pp:.3f}")
        metric("predicted_tokens_seconds", "gauge", "average generation throughput (tokens/s)", f"{tg:.3f}")
        pc = s.prefix_cache.stats()
        metric("prefix_cache_bytes", "gauge", "bytes held by the prefix cache", pc["bytes"])
        metric("prefix_cache_entries", "gauge", "states held by the prefix cache", pc["entries"])
        cache = getattr(state.model, "expert_cache", None)
        if cache is not None:
            metric("expert_cache_hit_ratio", "gauge", "routed-expert cache hit rate", f"{cache.stats.hit_rate:.4f}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ids = state.tokenizer.encode(req.content, add_bos=req.add_special)
        if req.with_pieces:
            return {"tokens": [{"id": i, "piece": state.tokenizer.decode([i])} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        bad = [t for t in req.tokens if not 0 <= t < state.tokenizer.vocab_size]
        if bad:
            raise errors.APIError(400, f"token ids {bad[:5]} are outside the vocabulary", param="tokens")
        return {"content": state.tokenizer.decode(req.tokens)}

    @app.post("/apply-template")
    async def apply_template(req: openai_api.ChatRequest):
        return {"prompt": openai_api.render_chat(state, req)}

    return app
