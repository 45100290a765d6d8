"""The Python chat encoding against the model's own jinja templates, and output parsing round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ds4py.chat import BOS, StreamParser, encode_chat, parse_output, text_of

ASSETS = Path(__file__).resolve().parents[1] / "ds4py" / "assets"
TEMPLATES = {"v4": "deepseek-ai-DeepSeek-V4.jinja", "flash-0731": "deepseek-ai-DeepSeek-V4-Flash-0731.jinja"}


def render(variant: str, messages, **kw) -> str:
    """The reference: the template rendered as transformers' apply_chat_template does (its tojson keeps
    key order and non-ASCII), plus the `from_json` filter the template uses (as llama.cpp provides)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **_: json.dumps(x, ensure_ascii=False)
    env.filters["from_json"] = json.loads
    template = env.from_string((ASSETS / TEMPLATES[variant]).read_text(encoding="utf-8"))
    # OpenAI content-part lists reach the template flattened to their text, as servers do before templating
    flat = [{**m, "content": text_of(m["content"])} if isinstance(m.get("content"), list) else m for m in messages]
    return template.render(messages=flat, bos_token=BOS, **{k: v for k, v in kw.items() if v is not None})


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Météo du jour",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
OTHER = {"type": "code_interpreter"}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": json.dumps({"city": "Paris", "days": 3})}}
CALL2 = {"id": "c2", "type": "function", "function": {"name": "calc", "arguments": {
    "expr": "1+1", "exact": True, "xs": [1, 2.5], "opts": {"a": None}}}}
CALL_EMPTY = {"id": "c3", "type": "function", "function": {"name": "now", "arguments": "{}"}}

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hi"}],
    "system_user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "two_systems": [{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"},
                    {"role": "system", "content": "B"}],
    "consecutive_users": [{"role": "user", "content": "one"}, {"role": "developer", "content": "two"},
                          {"role": "user", "content": None}],
    "multi_turn_reasoning": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "thought 1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "thought 2"},
    ],
    "assistant_without_reasoning": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
    "tool_round_trip": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "need weather", "tool_calls": [CALL, CALL2]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "assistant", "content": "It is sunny.", "tool_calls": [CALL_EMPTY]},
        {"role": "user", "content": [{"type": "text", "text": "thanks "}, {"type": "text", "text": "a lot"}]},
    ],
}
OPTIONS = [
    {},
    {"thinking": True},
    {"thinking": True, "drop_thinking": False},
    {"thinking": True, "reasoning_effort": "max"},
    {"thinking": True, "reasoning_effort": "high"},
    {"thinking": False, "reasoning_effort": "max"},
    {"tools": [WEATHER, OTHER]},
    {"tools": [WEATHER], "thinking": True},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"response_format": {"type": "json_object"}, "tools": [WEATHER]},
    {"add_generation_prompt": False},
    {"add_generation_prompt": False, "thinking": True},
]


@pytest.mark.parametrize("variant", list(TEMPLATES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_encoding_equals_the_template(variant, conv, opt):
    messages, kw = CONVERSATIONS[conv], OPTIONS[opt]
    expected = render(variant, messages, add_generation_prompt=kw.get("add_generation_prompt", True),
                      **{k: v for k, v in kw.items() if k != "add_generation_prompt"})
    assert encode_chat(messages, variant=variant, **kw) == expected


def test_empty_conversation_and_unknown_variant():
    assert encode_chat([], thinking=True, reasoning_effort="max") == render("v4", [], thinking=True,
                                                                          reasoning_effort="max",
                                                                          add_generation_prompt=True)
    with pytest.raises(ValueError, match="variant"):
        encode_chat([], variant="v5")


def completion_of(message: dict, thinking: bool) -> str:
    """What the model would generate for `message`: the encoding of the assistant turn after the prompt."""
    prompt = encode_chat([{"role": "user", "content": "q"}], thinking=thinking)
    full = encode_chat([{"role": "user", "content": "q"}, message], thinking=thinking, drop_thinking=False,
                       add_generation_prompt=False)
    assert full.startswith(prompt[: -len("<think>" if thinking else "</think>")])
    return full[len(prompt):]


@pytest.mark.parametrize("thinking", [False, True])
def test_parse_round_trips_tool_calls(thinking):
    message = {"role": "assistant", "content": "Let me check.", "reasoning_content": "plan" if thinking else None,
               "tool_calls": [CALL, CALL2, CALL_EMPTY]}
    parsed = parse_output(completion_of(message, thinking), thinking=thinking)
    assert parsed.content == "Let me check."
    assert parsed.reasoning_content == ("plan" if thinking else None)
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "calc", "now"]
    assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris", "days": 3}
    assert json.loads(parsed.tool_calls[1].arguments) == {"expr": "1+1", "exact": True, "xs": [1, 2.5],
                                                          "opts": {"a": None}}
    assert json.loads(parsed.tool_calls[2].arguments) == {}


def test_parse_generation_stopped_mid_block():
    assert parse_output("still thinking about", thinking=True).reasoning_content == "still thinking about"
    text = completion_of({"role": "assistant", "content": "ok", "tool_calls": [CALL, CALL2]}, False)
    cut = text[: text.index("calc") + 10]
    parsed = parse_output(cut, thinking=False)
    assert parsed.content == "ok" and [c.name for c in parsed.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("step", [1, 3, 7])
def test_stream_parser_matches_parse_output(step):
    message = {"role": "assistant", "content": "Hot <b>day</b>\n\nand more", "reasoning_content": "think </thin",
               "tool_calls": [CALL, CALL2]}
    text = completion_of(message, True)
    parser = StreamParser(thinking=True)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [e.tool_call for e in events if e.kind == "tool_call"]
    expected = parse_output(text, thinking=True)
    assert reasoning == expected.reasoning_content == "think </thin"
    assert content == expected.content
    assert calls == expected.tool_calls and len(calls) == 2
    assert not any("DSML" in e.text for e in events)
