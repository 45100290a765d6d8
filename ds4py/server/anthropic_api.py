"""Anthropic's Messages API (`POST /v1/messages`, what Claude-Code-style agents speak) mapped onto the
chat encoding: content blocks become chat messages, the output becomes thinking, text and tool_use
blocks, streamed as message_start / content_block_* / message_delta / message_stop events."""

from __future__ import annotations

import json
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


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    thinking: dict[str, Any] | None = None
    stream: bool = False


def block_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def to_messages(req: MessagesRequest) -> list[dict]:
    out: list[dict] = []
    if req.system:
        out.append({"role": "system", "content": block_text(req.system)})
    for m in req.messages:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise APIError(400, f"message role {role!r}: the Messages API has user and assistant turns",
                           param="messages")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": ""}
            for b in blocks:
                if b.get("type") == "text":
                    msg["content"] += b.get("text", "")
                elif b.get("type") == "thinking":
                    msg["reasoning_content"] = (msg.get("reasoning_content") or "") + b.get("thinking", "")
                elif b.get("type") == "tool_use":
                    msg.setdefault("tool_calls", []).append(
                        {"id": b.get("id"), "type": "function",
                         "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            out.append(msg)
            continue
        text = ""
        for b in blocks:
            if b.get("type") == "tool_result":
                if text:
                    out.append({"role": "user", "content": text})
                    text = ""
                body = b.get("content")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": body if isinstance(body, str) else block_text(body)})
            elif b.get("type") == "text":
                text += b.get("text", "")
            else:
                raise APIError(400, f"content block type {b.get('type')!r} is not supported (text and tool_result "
                                    "are)", param="messages")
        if text:
            out.append({"role": "user", "content": text})
    return out


def chat_tools(req: MessagesRequest) -> list[dict] | None:
    choice = req.tool_choice or {}
    if not req.tools or choice.get("type") == "none":
        return None
    tools = req.tools
    if choice.get("type") == "tool":
        tools = [t for t in tools if t.get("name") == choice.get("name")]
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t.get("input_schema", {})}} for t in tools]


class BlockBuilder:
    def __init__(self, message: dict):
        self.message = message
        self.blocks: list[dict] = message["content"]
        self.open: dict | None = None

    @staticmethod
    def event(kind: str, **fields) -> bytes:
        return format_sse_event(event=kind, data_str=json.dumps({"type": kind, **fields}, ensure_ascii=False))

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [self.event("content_block_stop", index=len(self.blocks) - 1)]

    def feed(self, e: StreamEvent) -> list[bytes]:
        kind = {"reasoning": "thinking", "content": "text", "tool_call": "tool_use"}[e.kind]
        out: list[bytes] = []
        if self.open is not None and (self.open["type"] != kind or kind == "tool_use"):
            out += self._close()
        if self.open is None:
            if kind == "text":
                block: dict[str, Any] = {"type": "text", "text": ""}
            elif kind == "thinking":
                block = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": e.tool_call.name,
                         "input": {}}
            self.blocks.append(block)
            self.open = block
            out.append(self.event("content_block_start", index=len(self.blocks) - 1, content_block=dict(block)))
        block, i = self.open, len(self.blocks) - 1
        if kind == "text":
            block["text"] += e.text
            out.append(self.event("content_block_delta", index=i, delta={"type": "text_delta", "text": e.text}))
        elif kind == "thinking":
            block["thinking"] += e.text
            out.append(self.event("content_block_delta", index=i,
                                  delta={"type": "thinking_delta", "thinking": e.text}))
        else:
            block["input"] = json.loads(e.tool_call.arguments)
            out.append(self.event("content_block_delta", index=i,
                                  delta={"type": "input_json_delta", "partial_json": e.tool_call.arguments}))
        return out

    def finish(self, stats) -> list[bytes]:
        out = self._close()
        m = self.message
        if any(b["type"] == "tool_use" for b in self.blocks):
            m["stop_reason"] = "tool_use"
        elif stats.finish_reason == "length":
            m["stop_reason"] = "max_tokens"
        else:
            m["stop_reason"] = "stop_sequence" if stats.stopped_by == "string" else "end_turn"
        m["usage"] = {"input_tokens": stats.prompt_tokens - stats.cached_tokens,
                      "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0,
                      "output_tokens": stats.generated_tokens}
        out.append(self.event("message_delta", delta={"stop_reason": m["stop_reason"], "stop_sequence": None},
                              usage={"output_tokens": stats.generated_tokens}))
        out.append(self.event("message_stop"))
        return out


@router.post("/v1/messages")
async def messages(req: MessagesRequest, request: Request):
    state = request.app.state.ds4py
    thinking = (req.thinking or {}).get("type") == "enabled"
    try:
        prompt = encode_chat(to_messages(req), chat_tools(req), thinking=thinking, variant=state.template_variant)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise APIError(400, f"cannot render the messages: {e}", param="messages") from None
    prompt_ids = state.tokenizer.encode(prompt)
    params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                            max_tokens=req.max_tokens, stop=list(req.stop_sequences or []))
    check_context(state.scheduler, prompt_ids, params, True)
    state.log_request(request, len(prompt_ids), params)
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": state.model_name, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": len(prompt_ids), "output_tokens": 0}}
    builder, parser = BlockBuilder(message), StreamParser(thinking)
    opening = [builder.event("message_start", message={**message, "content": []})]
    body = await build_output(state.scheduler, prompt_ids, params, request, parser, builder, opening, req.stream)
    if body is None:
        return message
    return StreamingResponse(body, media_type="text/event-stream")
