"""OpenAI's Responses API (`POST /v1/responses`, what Codex-style agents speak) mapped onto the chat
encoding: input items become chat messages, the output becomes reasoning, message and function_call
items, streamed as the typed `response.*` events."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from ds4py.chat import StreamEvent, StreamParser, encode_chat
from ds4py.sampling import SamplingParams
from ds4py.server.errors import APIError
from ds4py.server.jobs import build_output, check_context

router = APIRouter()


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    seed: int | None = None


def text_of_parts(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def to_messages(req: ResponsesRequest) -> list[dict]:
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            messages.append({"role": role, "content": text_of_parts(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("_closed"):
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            summary = "".join(s.get("text", "") for s in item.get("summary") or [])
            messages.append({"role": "assistant", "content": "", "reasoning_content": summary, "_pending": True})
        else:
            raise APIError(400, f"input item type {kind!r} is not supported", param="input")
    merged: list[dict] = []  # a reasoning item belongs to the assistant message that follows it
    for m in messages:
        if merged and merged[-1].get("_pending") and m["role"] == "assistant":
            m = {**m, "reasoning_content": merged.pop()["reasoning_content"]}
        merged.append(m)
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in merged]


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    out = []
    for t in tools or []:
        if t.get("type") != "function":
            continue  # built-in tools (web search, ...) do not exist here
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if k in t}})
    return out or None


class OutputBuilder:
    """Turns the parser's events into output items and, for streaming, the `response.*` events."""

    def __init__(self, response: dict):
        self.response = response
        self.items: list[dict] = response["output"]
        self.open: dict | None = None
        self.seq = 0

    def event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq, **fields}
        return format_sse_event(event=kind, data_str=json.dumps(data, ensure_ascii=False))

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self.items.index(item)
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=i,
                                  content_index=0, text=part["text"]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                  content_index=0, part=part))
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            out.append(self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=i,
                                  summary_index=0, text=part["text"]))
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=i, item=item))
        return out

    def feed(self, e: StreamEvent) -> list[bytes]:
        out: list[bytes] = []
        kind = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call"}[e.kind]
        if self.open is not None and (self.open["type"] != kind or kind == "function_call"):
            out += self._close()
        if self.open is None:
            if kind == "message":
                item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                        "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]}
            elif kind == "reasoning":
                item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "status": "in_progress",
                        "summary": [{"type": "summary_text", "text": ""}]}
            else:
                item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "status": "in_progress",
                        "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": e.tool_call.name, "arguments": ""}
            self.items.append(item)
            self.open = item
            i = len(self.items) - 1
            out.append(self.event("response.output_item.added", output_index=i, item=item))
            if kind == "message":
                out.append(self.event("response.content_part.added", item_id=item["id"], output_index=i,
                                      content_index=0, part=item["content"][0]))
        item, i = self.open, len(self.items) - 1
        if kind == "message":
            item["content"][0]["text"] += e.text
            out.append(self.event("response.output_text.delta", item_id=item["id"], output_index=i,
                                  content_index=0, delta=e.text))
        elif kind == "reasoning":
            item["summary"][0]["text"] += e.text
            out.append(self.event("response.reasoning_summary_text.delta", item_id=item["id"], output_index=i,
                                  summary_index=0, delta=e.text))
        else:
            item["arguments"] = e.tool_call.arguments
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                  delta=item["arguments"]))
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  arguments=item["arguments"]))
        return out

    def finish(self, stats) -> list[bytes]:
        out = self._close()
        r = self.response
        r["status"] = "completed" if stats.finish_reason != "length" else "incomplete"
        r["incomplete_details"] = {"reason": "max_output_tokens"} if stats.finish_reason == "length" else None
        r["usage"] = {"input_tokens": stats.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": stats.cached_tokens},
                      "output_tokens": stats.generated_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": stats.prompt_tokens + stats.generated_tokens}
        text = "".join(p["text"] for it in self.items if it["type"] == "message" for p in it["content"])
        r["output_text"] = text
        kind = "response.completed" if r["status"] == "completed" else "response.incomplete"
        return out + [self.event(kind, response=r)]


@router.post("/v1/responses")
async def responses(req: ResponsesRequest, request: Request):
    state = request.app.state.ds4py
    effort = (req.reasoning or {}).get("effort")
    thinking = effort not in (None, "none", "minimal")
    fmt = (req.text or {}).get("format")
    response_format = fmt if fmt and fmt.get("type") != "text" else None
    tools = chat_tools(req.tools) if req.tool_choice != "none" else None
    try:
        prompt = encode_chat(to_messages(req), tools, thinking=thinking, reasoning_effort=effort,
                             response_format=response_format, variant=state.template_variant)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise APIError(400, f"cannot render the input: {e}", param="input") from None
    prompt_ids = state.tokenizer.encode(prompt)
    params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                            max_tokens=req.max_output_tokens or state.default_max_tokens)
    check_context(state.scheduler, prompt_ids, params, bool(req.max_output_tokens))
    state.log_request(request, len(prompt_ids), params)
    response = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "status": "in_progress", "model": state.model_name, "output": [], "parallel_tool_calls": True,
                "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "temperature": params.temperature,
                "top_p": params.top_p, "max_output_tokens": req.max_output_tokens, "incomplete_details": None,
                "error": None, "instructions": req.instructions, "metadata": {}, "usage": None}
    builder, parser = OutputBuilder(response), StreamParser(thinking)
    opening = [builder.event("response.created", response=dict(response)),
               builder.event("response.in_progress", response=dict(response))]
    body = await build_output(state.scheduler, prompt_ids, params, request, parser, builder, opening, req.stream)
    if body is None:
        return response
    return StreamingResponse(body, media_type="text/event-stream")
