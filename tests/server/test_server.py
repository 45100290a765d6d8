"""The real server on a loopback port, driven by the official `openai` client and plain HTTP.

Two models: a tiny random-weight V4 model (answers are checked against `Model.generate` on the same
prompt, so the server path adds nothing and loses nothing), and a scripted stand-in whose fixed answers
exercise tool calls and thinking through every API."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

import ds4py
from ds4py.chat import encode_chat
from ds4py.errors import Ds4pyError
from ds4py.server import build_state
from ds4py.synthetic import make_model
from ds4py.tokenizer import Tokenizer, load_tokenizer
from tests.server.harness import LiveServer, ScriptedModel, serve_args

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL_TEXT = ('Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '</｜DSML｜tool_calls>')


def scripted_answer(prompt: str) -> str:
    asked = re.search(r"Question number (\d+)", prompt)
    if asked:  # long enough for concurrent requests to overlap; distinct, so cross-talk would show
        return f"Answer {asked.group(1)}: " + " ".join(f"w{asked.group(1)}x{k}" for k in range(15))
    if prompt.endswith("<think>"):
        return "I should greet.</think>Hello!"
    if "<tool_result>" in prompt.rsplit("<｜User｜>", 1)[-1]:
        return "It is sunny in Paris."
    if "get_weather" in prompt:
        return CALL_TEXT
    return "Plain answer."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv") / "tiny.gguf"
    make_model(str(path), preset="tiny", seed=5)
    model = ds4py.load(str(path), ctx=512)
    return str(path), model, load_tokenizer(str(path), model.source.metadata, model.config)


@pytest.fixture(scope="module")
def server(tiny):
    path, model, tokenizer = tiny
    state = build_state(serve_args(model=path), model=model, tokenizer=tokenizer)
    with LiveServer(state) as live:
        yield live


@pytest.fixture(scope="module")
def scripted():
    tokenizer = Tokenizer.default()
    model = ScriptedModel(tokenizer, scripted_answer)
    state = build_state(serve_args(), model=model, tokenizer=tokenizer)
    with LiveServer(state) as live:
        yield live


def client(live, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def greedy_text(tiny, messages, n) -> tuple[list[int], str]:
    _, model, tokenizer = tiny
    ids = tokenizer.encode(encode_chat(messages))
    new = model.generate(ids, max_new_tokens=n)
    return ids, tokenizer.decode([t for t in new if t not in tokenizer.eos_ids])


# --- OpenAI chat completions on the real model ---------------------------------------------------------
def test_chat_matches_generate(server, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids, text = greedy_text(tiny, messages, 12)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12


def test_chat_stream_with_usage(server, tiny):
    messages = [{"role": "user", "content": "Count to three."}]
    chunks = list(client(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids, expected = greedy_text(tiny, messages, 10)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_logprobs(server, tiny):
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy takes the top token


def test_seeded_sampling_reproducible(server):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=11)
    c = client(server)
    assert c.chat.completions.create(**kw).choices[0].message.content == \
        c.chat.completions.create(**kw).choices[0].message.content


def test_prefix_cache_reuses_exact_state(server, tiny):
    """An agent's second turn starts with the first turn's prompt: those tokens are not prefilled again,
    and the answer equals a fresh greedy run of the whole second prompt."""
    c = client(server)
    turn1 = [{"role": "user", "content": "Tell me a short story about a fox and a crow."}]
    a1 = c.chat.completions.create(model="tiny", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    a2 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    ids1, _ = greedy_text(tiny, turn1, 0 + 1)
    assert a2.usage.prompt_tokens_details.cached_tokens >= len(ids1)
    _, expected = greedy_text(tiny, turn2, 8)
    assert a2.choices[0].message.content == expected
    # the identical request again: the whole prompt comes from the cache
    a3 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    assert a3.usage.prompt_tokens_details.cached_tokens == a3.usage.prompt_tokens
    assert a3.choices[0].message.content == expected


# --- legacy completions --------------------------------------------------------------------------------
def test_completions_text_and_ids(server, tiny):
    _, model, tokenizer = tiny
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    ids = tokenizer.encode("Once upon a time", add_bos=True)
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6))
    assert r.choices[0].text == expected and r.usage.prompt_tokens == len(ids)
    r2 = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == expected
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == expected


# --- tool calls and thinking (scripted model) ------------------------------------------------------------
def test_tool_call_round_trip(scripted):
    c = client(scripted)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    r2 = c.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"


def test_tool_call_stream(scripted):
    chunks = list(client(scripted).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_prompts_go_in_the_models_chunks(scripted):
    """The server feeds a prompt in the model's prefill chunks, as `ds4py run` and `Model.logits` do, so its
    answer to a prompt is theirs bit for bit (a product's bits can depend on its rows)."""
    model = scripted.state.model
    model.prefill_chunk, model.fed = 7, []
    try:
        r = client(scripted).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "A prompt of its own, fed in chunks of seven."}])
    finally:
        model.prefill_chunk = 256
    n = r.usage.prompt_tokens
    assert n > 14
    assert model.fed[: -(-n // 7)] == [7] * (n // 7) + ([n % 7] if n % 7 else [])


def test_thinking(scripted):
    c = client(scripted)
    kw = dict(model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"chat_template_kwargs":
                                                                                  {"thinking": True}})
    m = c.chat.completions.create(**kw).choices[0].message
    assert m.reasoning_content == "I should greet." and m.content == "Hello!"
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks) == \
        "I should greet."
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hello!"


def test_responses_api(scripted):
    c = client(scripted)
    r = c.responses.create(model="m", input="Weather in Paris?",
                           tools=[{"type": "function", "name": "get_weather",
                                   "parameters": WEATHER_TOOL["function"]["parameters"]}])
    kinds = [item.type for item in r.output]
    assert kinds == ["message", "function_call"]
    assert r.output_text == "Let me check."
    fc = r.output[1]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris", "days": 2}
    r2 = c.responses.create(model="m", input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
        {"type": "function_call_output", "call_id": fc.call_id, "output": "clear"}],
        tools=[{"type": "function", "name": "get_weather", "parameters": {}}])
    assert r2.output_text == "It is sunny in Paris."
    events = list(c.responses.create(model="m", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Plain answer."
    assert events[-1].response.usage.output_tokens > 0


def test_anthropic_messages(scripted):
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}]}
    r = httpx.post(scripted.url + "/v1/messages", json=body, timeout=30).json()
    assert r["type"] == "message" and r["stop_reason"] == "tool_use"
    assert r["content"][0] == {"type": "text", "text": "Let me check."}
    use = r["content"][1]
    assert use["type"] == "tool_use" and use["input"] == {"city": "Paris", "days": 2}
    body["messages"] += [{"role": "assistant", "content": r["content"]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                                       "content": "clear"}]}]
    r2 = httpx.post(scripted.url + "/v1/messages", json=body, timeout=30).json()
    assert r2["content"] == [{"type": "text", "text": "It is sunny in Paris."}] and r2["stop_reason"] == "end_turn"
    body["stream"] = True
    with httpx.stream("POST", scripted.url + "/v1/messages", json=body, timeout=30) as resp:
        events = [line.removeprefix("event: ") for line in resp.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in events


# --- llama-server style endpoints ----------------------------------------------------------------------
def test_plain_endpoints(server, tiny):
    _, model, tokenizer = tiny
    u = server.url
    assert httpx.get(u + "/health").json() == {"status": "ok"}
    models = httpx.get(u + "/v1/models").json()
    assert models["object"] == "list" and set(models["data"][0]) == {"id", "object", "created", "owned_by"}
    props = httpx.get(u + "/props").json()
    assert props["n_ctx"] == 512 and props["architecture"] == "deepseek4"
    assert props["quantization"].get("q8_0") and props["quantization"].get("mxfp4")
    assert "resident" in props["memory_mode"]
    ids = httpx.post(u + "/tokenize", json={"content": "Hello, world"}).json()["tokens"]
    assert ids == tokenizer.encode("Hello, world")
    assert httpx.post(u + "/detokenize", json={"tokens": ids}).json()["content"] == "Hello, world"
    messages = [{"role": "user", "content": "hi"}]
    assert httpx.post(u + "/apply-template", json={"messages": messages}).json()["prompt"] == encode_chat(messages)
    metrics = httpx.get(u + "/metrics").text
    assert "# TYPE ds4py_requests_total counter" in metrics and "ds4py_tokens_predicted_total" in metrics


# --- errors ----------------------------------------------------------------------------------------------
def test_errors(server):
    u = server.url
    r = httpx.post(u + "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(u + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(u + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 600}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "512" in err["message"]
    r = httpx.post(u + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 5000})
    assert r.status_code == 400 and "5000" in r.json()["error"]["message"]
    r = httpx.post(u + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    bad_call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
    r = httpx.post(u + "/v1/chat/completions", json={"messages": [bad_call]})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(u + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)


def test_api_key(tiny):
    path, model, tokenizer = tiny
    state = build_state(serve_args(model=path, api_key="sekret"), model=model, tokenizer=tokenizer)
    with LiveServer(state) as live:
        with pytest.raises(openai.AuthenticationError):
            client(live, api_key="wrong").models.list()
        assert client(live, api_key="sekret").models.list().data[0].id == "tiny"
        assert httpx.get(live.url + "/health").status_code == 200


# --- concurrency ---------------------------------------------------------------------------------------
def test_concurrent_clients_and_disconnect(scripted):
    """Three streaming clients at once all make progress before any finishes (their tokens are decoded in
    one batched step per round), each gets its own answer, and a fourth that leaves mid-stream frees its
    slot. (The real model's batched decoding is checked against one-at-a-time decoding in
    tests/model/test_batch.py.)"""
    server = scripted
    sched = server.state.scheduler
    cancelled_before = sched.counters.cancelled
    results, first_token, finished = {}, {}, {}

    def ask(i: int):
        text = ""
        for ch in client(server).chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Question number {i}?"}], stream=True):
            if ch.choices and ch.choices[0].delta.content:
                first_token.setdefault(i, time.monotonic())
                text += ch.choices[0].delta.content
        finished[i] = time.monotonic()
        results[i] = text

    def leave():
        body = {"messages": [{"role": "user", "content": "Question number 99"}], "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break  # closes the connection mid-stream

    server.state.model.delay = 0.01  # seconds per model call: requests overlap for sure
    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)] + [threading.Thread(target=leave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.state.model.delay = 0.0
    for i in range(3):
        assert results[i] == scripted_answer(f"Question number {i}?")
    assert max(first_token.values()) < min(finished.values())  # interleaved, not one after another
    assert max(server.state.model.batch_sizes) >= 3  # decoded together
    deadline = time.time() + 10
    while sched.counters.cancelled == cancelled_before and time.time() < deadline:
        time.sleep(0.05)
    assert sched.counters.cancelled == cancelled_before + 1
    assert not sched.active and not sched.waiting


def test_queue_full_is_503(tiny):
    """A server whose engine is busy (here: not started) queues one request and refuses the next."""
    path, model, tokenizer = tiny
    state = build_state(serve_args(model=path, parallel=1, queue=1), model=model, tokenizer=tokenizer)
    live = LiveServer(state)
    live.thread.start()
    while not live.server.started:
        time.sleep(0.02)
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)))
        waiting.start()
        while not state.scheduler.waiting:
            time.sleep(0.02)
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=5)
        assert r.status_code == 503 and "capacity" in r.json()["error"]["message"]
        state.scheduler.start()  # the engine frees up: the queued request is answered
        waiting.join(timeout=30)
        assert answers[0].status_code == 200
    finally:
        live.server.should_exit = True
        live.thread.join(timeout=10)
        state.scheduler.stop()


def test_concurrent_clients_on_the_real_model(server, tiny):
    """The same with the tiny V4 model (batched decode through the real network): every client gets its
    full answer with the right usage, each answer is greedy-consistent with its own log-probabilities
    (the chosen token is the top one), and a client that leaves frees its slot."""
    sched = server.state.scheduler
    cancelled_before = sched.counters.cancelled
    out = {}

    def ask(i: int):
        r = client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Real question {i}"}], max_tokens=24,
            temperature=0, logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
        out[i] = r

    def leave():
        body = {"messages": [{"role": "user", "content": "leaving"}], "max_tokens": 300, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)] + [threading.Thread(target=leave)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(3):
        r = out[i]
        assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
        for item in r.choices[0].logprobs.content:
            assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    deadline = time.time() + 10
    while sched.counters.cancelled == cancelled_before and time.time() < deadline:
        time.sleep(0.05)
    assert sched.counters.cancelled == cancelled_before + 1 and not sched.active


# --- the bundled nano model, loaded by `ds4py serve` without a model argument -------------------------------
def test_serves_the_bundled_nano_model():
    """A multi-turn conversation over HTTP with the default model answers as its training taught
    (the golden tests pin its exact tokens; this checks the path through the server)."""
    state = build_state(serve_args(model=None, alias=None))
    with LiveServer(state) as live:
        c = client(live)
        assert [m.id for m in c.models.list().data] == ["nano"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = c.chat.completions.create(model="nano", messages=messages, max_tokens=30, temperature=0)
        assert "Paris" in first.choices[0].message.content and first.choices[0].finish_reason == "stop"
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Who wrote Moby Dick?"}]
        second = c.chat.completions.create(model="nano", messages=messages, max_tokens=30, temperature=0)
        assert "Melville" in second.choices[0].message.content
        assert second.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's state was reused


# --- speculative decoding ------------------------------------------------------------------------------
def test_speculative_server_answers_as_greedy_and_reuses_the_prefix(tmp_path):
    """`serve --speculative` on a model with its MTP block: concurrent greedy requests (their prompts read a chunk a
    round) get plain greedy's answers, a second turn continues the first's cached state (with the MTP block's),
    sampling with a seed repeats; a model without the block is refused at start with what to do."""
    import concurrent.futures

    path = tmp_path / "tiny-mtp.gguf"
    make_model(str(path), preset="tiny", seed=5, mtp=True)
    model = ds4py.load(str(path), ctx=512)
    model.prefill_chunk = 8  # prompts read a chunk a round, between the other requests' tokens
    tokenizer = load_tokenizer(str(path), model.source.metadata, model.config)
    tiny = (str(path), model, tokenizer)
    state = build_state(serve_args(model=str(path), speculative=True), model=model, tokenizer=tokenizer)
    with LiveServer(state) as live:
        c = client(live)
        asks = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda m: c.chat.completions.create(
                model="tiny", messages=m, max_tokens=10, temperature=0).choices[0].message.content, asks))
        assert answers == [greedy_text(tiny, m, 10)[1] for m in asks]
        turn2 = asks[0] + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "More?"}]
        a2 = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=10, temperature=0)
        assert a2.choices[0].message.content == greedy_text(tiny, turn2, 10)[1]
        assert a2.usage.prompt_tokens_details.cached_tokens >= len(greedy_text(tiny, asks[0], 1)[0])
        kw = dict(model="tiny", messages=asks[1], max_tokens=8, temperature=0.9, seed=3)
        assert c.chat.completions.create(**kw).choices[0].message.content == \
            c.chat.completions.create(**kw).choices[0].message.content
    no_mtp = tmp_path / "tiny.gguf"
    make_model(str(no_mtp), preset="tiny", seed=5)
    m = ds4py.load(str(no_mtp))
    with pytest.raises(Ds4pyError, match="--speculative needs the model's MTP block"):
        build_state(serve_args(model=str(no_mtp), speculative=True), model=m, tokenizer=tokenizer)
