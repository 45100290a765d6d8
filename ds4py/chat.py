"""The DeepSeek V4 chat encoding, written out in Python so that it renders exactly what the model's chat
templates render (ds4py/assets/*.jinja; the tests compare the two), and the parsing of the model's
output back into reasoning, content and DSML tool calls."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START, TOOL_CALLS_END = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"

EFFORT_HIGH_TEXT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking "
    "and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic "
    "against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire "
    "deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis "
    "to ensure absolutely no assumption is left unchecked.\n\n"
)
EFFORT_BEYOND_TEXT = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\nYou MUST reason with the "
    "utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its "
    "most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather "
    "than any surface symptom.\nDo not stop reasoning until you have independently verified the solution from "
    "multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)
# variant -> reasoning_effort value -> the text that opens the prompt
EFFORT = {
    "v4": {"max": EFFORT_HIGH_TEXT},
    "flash-0731": {"high": EFFORT_HIGH_TEXT, "max": EFFORT_BEYOND_TEXT},
}
RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
TOOLS_HEADER = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n<{DSML}tool_calls>\n<{DSML}invoke '
    f'name="$TOOL_NAME">\n<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    f'</{DSML}parameter>\n...\n</{DSML}invoke>\n<{DSML}invoke name="$TOOL_NAME2">\n...\n</{DSML}invoke>\n'
    f'</{DSML}tool_calls>\n\nString parameters should be specified as is and set `string="true"`. For all other '
    'types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\nOtherwise, output directly after "
    f"{THINK_END} with tool calls or final response.\n\n### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = "\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"


def to_json(value) -> str:
    """JSON as the templates' `tojson` writes it under transformers (keys in order, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def text_of(content) -> str:
    """OpenAI content: a string, None, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return str(content)


def system_prompt(messages: list[dict], tools: list[dict] | None, response_format) -> str:
    parts = [text_of(m.get("content")) for m in messages if m.get("role") == "system"]
    prompt = "\n\n".join(parts)
    if tools:
        schemas = "".join(to_json(t["function"]) + "\n" for t in tools if t.get("type") == "function")
        block = TOOLS_HEADER + schemas + TOOLS_FOOTER
        prompt = prompt + "\n\n" + block if prompt else block
    if response_format is not None:
        if prompt:
            prompt += "\n\n"
        prompt += RESPONSE_FORMAT_HEADER + to_json(response_format)
    return prompt


def tool_calls_block(tool_calls: list[dict]) -> str:
    out = f"\n\n<{DSML}tool_calls>\n"
    for call in tool_calls:
        func = call["function"]
        out += f'<{DSML}invoke name="{func["name"]}">\n'
        args = func.get("arguments") or {}
        if isinstance(args, str):
            args = json.loads(args)
        for key, val in args.items():
            if isinstance(val, str):
                out += f'<{DSML}parameter name="{key}" string="true">{val}</{DSML}parameter>\n'
            else:
                out += f'<{DSML}parameter name="{key}" string="false">{to_json(val)}</{DSML}parameter>\n'
        if not args:
            out += "\n"
        out += f"</{DSML}invoke>\n"
    return out + f"</{DSML}tool_calls>"


def encode_chat(
    messages: list[dict],
    tools: list[dict] | None = None,
    *,
    thinking: bool = False,
    reasoning_effort: str | None = None,
    response_format=None,
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    variant: str = "v4",
    bos_token: str = BOS,
) -> str:
    """The prompt text for OpenAI-style `messages` (roles system, developer, user, assistant, tool).
    `variant` is "v4" (deepseek-ai-DeepSeek-V4.jinja) or "flash-0731"; they differ in reasoning effort."""
    if variant not in EFFORT:
        raise ValueError(f"unknown chat template variant {variant!r}: use one of {sorted(EFFORT)}")
    out = bos_token
    if messages and thinking and reasoning_effort in EFFORT[variant]:
        out += EFFORT[variant][reasoning_effort]
    out += system_prompt(messages, tools, response_format)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer", "tool")), default=-1)
    has_tool_results = any(m.get("role") == "tool" for m in messages)
    in_user = False
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("user", "developer", "tool"):
            out += "\n\n" if in_user else USER
            in_user = True
            body = text_of(m.get("content"))
            out += f"<tool_result>{body}</tool_result>" if role == "tool" else body
        elif role == "assistant":
            in_user = False
            out += ASSISTANT
            keep = thinking and (not drop_thinking or bool(tools) or i > last_user or has_tool_results)
            if keep:
                out += THINK_START + (m.get("reasoning_content") or "") + THINK_END
            else:
                out += THINK_END
            out += text_of(m.get("content"))
            if m.get("tool_calls"):
                out += tool_calls_block(m["tool_calls"])
            out += EOS
    if add_generation_prompt:
        out += ASSISTANT + (THINK_START if thinking else THINK_END)
    return out


# --- the model's output ------------------------------------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass
class ParsedOutput:
    reasoning_content: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.S)
PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.S)


def parse_tool_calls(block: str) -> list[ToolCall]:
    """Complete `invoke`s of a DSML block; a call cut off by the end of generation is dropped."""
    calls = []
    for name, body in INVOKE.findall(block):
        args = {}
        for key, is_string, value in PARAM.findall(body):
            if is_string == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except json.JSONDecodeError:
                    args[key] = value
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


def parse_output(text: str, thinking: bool) -> ParsedOutput:
    """Split a completion (what follows the generation prompt) into reasoning, content and tool calls.
    A generation stopped mid-thought is all reasoning; one stopped mid-call keeps its complete calls."""
    text = text.split(EOS, 1)[0]
    reasoning = None
    if thinking:
        reasoning, sep, text = text.partition(THINK_END)
        if not sep:
            return ParsedOutput(reasoning, "", [])
    content, sep, block = text.partition(TOOL_CALLS_START)
    calls = parse_tool_calls(block) if sep else []
    if sep and content.endswith("\n\n"):
        content = content[:-2]
    return ParsedOutput(reasoning, content, calls)


@dataclass
class StreamEvent:
    kind: str  # "reasoning", "content" or "tool_call"
    text: str = ""
    tool_call: ToolCall | None = None


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StreamParser:
    """Feed completion text as it streams; get reasoning and content deltas as soon as they cannot be
    the start of a `</think>` or a tool-call block, and each tool call once its `invoke` closes."""

    def __init__(self, thinking: bool):
        self.text = ""
        self.phase = "reasoning" if thinking else "content"
        self.pos = 0          # characters of `text` already turned into events
        self.calls_done = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self.text += delta.replace(EOS, "") if EOS in delta else delta
        events: list[StreamEvent] = []
        while True:
            rest = self.text[self.pos:]
            if self.phase == "reasoning":
                i = rest.find(THINK_END)
                if i < 0:
                    safe = len(rest) - held_back(rest, THINK_END)
                    if safe > 0:
                        events.append(StreamEvent("reasoning", rest[:safe]))
                        self.pos += safe
                    return events
                if i:
                    events.append(StreamEvent("reasoning", rest[:i]))
                self.pos += i + len(THINK_END)
                self.phase = "content"
            elif self.phase == "content":
                marker = "\n\n" + TOOL_CALLS_START
                i = rest.find(TOOL_CALLS_START)
                if i < 0:
                    hold = max(held_back(rest, marker), held_back(rest, TOOL_CALLS_START))
                    safe = len(rest) - hold
                    if safe > 0:
                        events.append(StreamEvent("content", rest[:safe]))
                        self.pos += safe
                    return events
                body = rest[:i]
                if body.endswith("\n\n"):
                    body = body[:-2]
                if body:
                    events.append(StreamEvent("content", body))
                self.pos += i + len(TOOL_CALLS_START)
                self.phase = "tools"
            else:
                calls = parse_tool_calls(rest)
                for call in calls[self.calls_done:]:
                    events.append(StreamEvent("tool_call", tool_call=call))
                self.calls_done = len(calls)
                return events

    def finish(self) -> list[StreamEvent]:
        """Flush what was held back (the generation ended)."""
        rest = self.text[self.pos:]
        self.pos = len(self.text)
        if rest and self.phase in ("reasoning", "content"):
            return [StreamEvent(self.phase, rest)]
        return []
