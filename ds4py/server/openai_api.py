"""OpenAI's Chat Completions and (legacy) Completions endpoints over the engine."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from ds4py.chat import StreamParser, encode_chat, parse_output
from ds4py.sampling import SamplingParams
from ds4py.server.errors import APIError
from ds4py.server.jobs import check_context, complete, run_job

router = APIRouter()


class SamplingFields(BaseModel):
    """Sampling fields shared by every endpoint (OpenAI names, plus llama-server's top_k/min_p/...)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False

    def sampling(self, default_max: int, max_tokens: int | None = None, logprobs: int | None = None) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, f"n={self.n}: ds4py returns one choice per request; send n=1", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p or 0.0,
            repetition_penalty=self.repeat_penalty or 1.0, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed,
            max_tokens=max_tokens or self.max_tokens or default_max, stop=stop, logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    thinking: dict[str, Any] | bool | None = None           # DeepSeek API: {"type": "enabled"}
    chat_template_kwargs: dict[str, Any] | None = None      # llama-server: {"thinking": true}


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = ""
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


def thinking_of(req: ChatRequest) -> bool:
    """Thinking is off unless the request turns it on: chat_template_kwargs thinking/enable_thinking,
    DeepSeek's `thinking: {"type": "enabled"}`, or a reasoning_effort other than "none"."""
    kw = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            return bool(kw[key])
    if isinstance(req.thinking, dict):
        return req.thinking.get("type") == "enabled"
    if isinstance(req.thinking, bool):
        return req.thinking
    return req.reasoning_effort not in (None, "none", "minimal")


def effort_of(req: ChatRequest) -> str | None:
    effort = (req.chat_template_kwargs or {}).get("reasoning_effort", req.reasoning_effort)
    return {"xhigh": "max"}.get(effort, effort)


def tools_of(tools: list[dict] | None, tool_choice) -> list[dict] | None:
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}: only that one
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        chosen = [t for t in tools if (t.get("function") or t).get("name") == name]
        if not chosen:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return chosen
    return tools


ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages: list[dict]) -> None:
    """400 naming the first message the chat encoding cannot take."""
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {role!r}: use one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        for j, call in enumerate(m.get("tool_calls") or []):
            args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            if isinstance(args, str):
                try:
                    json.loads(args or "{}")
                except json.JSONDecodeError as e:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e})",
                                   param=f"messages[{i}].tool_calls") from None


def render_chat(state, req: ChatRequest) -> str:
    check_messages(req.messages)
    try:
        return encode_chat(req.messages, tools_of(req.tools, req.tool_choice), thinking=thinking_of(req),
                           reasoning_effort=effort_of(req), response_format=req.response_format,
                           variant=state.template_variant)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise APIError(400, f"cannot render the messages: {e}", param="messages") from None


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def token_logprob(tokenizer, info, n_top: int) -> dict:
    def one(tid: int, lp: float) -> dict:
        text = tokenizer.decode([tid])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    out = one(info.token, info.logprob)
    out["top_logprobs"] = [one(t, lp) for t, lp in info.top[:n_top]]
    return out


def sse(data) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


def tool_call_json(call, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        out["index"] = index
    return out


def prompt_ids_for_chat(state, req: ChatRequest) -> list[int]:
    return state.tokenizer.encode(render_chat(state, req))


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    state = request.app.state.ds4py
    thinking = thinking_of(req)
    prompt_ids = prompt_ids_for_chat(state, req)
    n_top = req.top_logprobs or 0
    params = req.sampling(state.default_max_tokens, req.max_completion_tokens,
                          logprobs=max(n_top, 1) if req.logprobs else None)
    check_context(state.scheduler, prompt_ids, params, bool(req.max_completion_tokens or req.max_tokens))
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name
    state.log_request(request, len(prompt_ids), params)

    if not req.stream:
        done = await complete(state.scheduler, prompt_ids, params, request)
        parsed = parse_output(done.text, thinking)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if thinking:
            message["reasoning_content"] = parsed.reasoning_content
        finish = done.stats.finish_reason
        if parsed.tool_calls:
            message["tool_calls"] = [tool_call_json(c) for c in parsed.tool_calls]
            finish = "tool_calls"
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [token_logprob(state.tokenizer, d.info, n_top) for d in done.deltas]}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                "usage": usage(done.stats), "system_fingerprint": state.fingerprint}

    events = run_job(state.scheduler, prompt_ids, params, request)
    first = await anext(events)  # errors before the first token (queue full) become HTTP errors

    async def stream():
        def chunk(delta: dict, finish=None, logprobs=None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "system_fingerprint": state.fingerprint,
                        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        parser, n_calls = StreamParser(thinking), 0
        yield chunk({"role": "assistant", "content": ""})
        ev = first
        while True:
            if ev.kind == "done":
                break
            out = []
            for e in parser.feed(ev.delta.text):
                if e.kind == "tool_call":
                    out.append({"tool_calls": [tool_call_json(e.tool_call, n_calls)]})
                    n_calls += 1
                else:
                    out.append({"reasoning_content" if e.kind == "reasoning" else "content": e.text})
            lp = {"content": [token_logprob(state.tokenizer, ev.delta.info, n_top)]} if req.logprobs else None
            if lp and not out:
                out.append({"content": ""})
            for delta in out:
                yield chunk(delta, logprobs=lp)
                lp = None
            ev = await anext(events)
        for e in parser.finish():
            yield chunk({"reasoning_content" if e.kind == "reasoning" else "content": e.text})
        finish = "tool_calls" if n_calls else ev.stats.finish_reason
        yield chunk({}, finish=finish)
        if req.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(ev.stats)})
        yield sse("[DONE]")

    return StreamingResponse(guarded(stream(), events), media_type="text/event-stream")


async def guarded(body, events):
    """Close the job's event stream however the response ends (a client that left cancels it)."""
    try:
        async for part in body:
            yield part
    finally:
        await events.aclose()


def completion_prompt(state, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < state.model.config.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary "
                                f"[0, {state.model.config.vocab_size})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "a list of several prompts is not supported: send one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    ids = state.tokenizer.encode(prompt, add_bos=True)
    if len(ids) < 1:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state.ds4py
    prompt_ids = completion_prompt(state, req.prompt)
    params = req.sampling(state.default_max_tokens, logprobs=req.logprobs or None)
    check_context(state.scheduler, prompt_ids, params, bool(req.max_tokens))
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name
    echo = req.prompt if (req.echo and isinstance(req.prompt, str)) else ""
    state.log_request(request, len(prompt_ids), params)

    def logprobs_of(deltas) -> dict | None:
        if req.logprobs is None:
            return None
        tok = state.tokenizer
        return {"tokens": [tok.decode([d.token]) for d in deltas], "token_logprobs": [d.info.logprob for d in deltas],
                "top_logprobs": [{tok.decode([t]): lp for t, lp in d.info.top[:req.logprobs]} for d in deltas]}

    if not req.stream:
        done = await complete(state.scheduler, prompt_ids, params, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": echo + done.text, "logprobs": logprobs_of(done.deltas),
                             "finish_reason": done.stats.finish_reason}],
                "usage": usage(done.stats)}

    events = run_job(state.scheduler, prompt_ids, params, request)
    first = await anext(events)

    async def stream():
        def chunk(text: str, finish=None, deltas=()) -> bytes:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": text, "logprobs": logprobs_of(deltas) if deltas else None,
                                     "finish_reason": finish}]})

        if echo:
            yield chunk(echo)
        ev = first
        while ev.kind != "done":
            if ev.delta.text or req.logprobs is not None:
                yield chunk(ev.delta.text, deltas=[ev.delta])
            ev = await anext(events)
        yield chunk("", finish=ev.stats.finish_reason)
        if req.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": usage(ev.stats)})
        yield sse("[DONE]")

    return StreamingResponse(guarded(stream(), events), media_type="text/event-stream")


