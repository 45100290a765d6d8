"""The bridge between HTTP handlers (asyncio) and the engine thread: submit a job, receive its events
as an async iterator; leaving the iteration early (the client went away) cancels the job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from ds4py.errors import ContextOverflowError
from ds4py.generation import Delta, GenerationStats
from ds4py.sampling import SamplingParams
from ds4py.server.errors import APIError
from ds4py.server.scheduler import Event, Job, QueueFull, Scheduler


@dataclass
class Completion:
    """A finished (non-streamed) generation."""

    deltas: list[Delta] = field(default_factory=list)
    stats: GenerationStats | None = None

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)


def check_context(scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams, max_given: bool) -> None:
    """400 with the token counts when the prompt (plus the asked-for tokens) does not fit; when the
    client did not ask for a number, generate at most to the end of the context."""
    ctx = scheduler.model.ctx
    n = len(prompt_ids)
    if n >= ctx:
        raise APIError(400, f"the prompt is {n} tokens, the context is {ctx}: it does not fit (leave at least "
                            "one token to generate); shorten the conversation or start the server with a larger "
                            "--ctx", param="messages", code="context_length_exceeded")
    if not max_given:
        params.max_tokens = min(params.max_tokens, ctx - n)
    elif n + params.max_tokens > ctx:
        raise APIError(400, f"the prompt is {n} tokens and max_tokens asks for {params.max_tokens}: "
                            f"{n + params.max_tokens} > the context of {ctx}; ask for at most {ctx - n} tokens",
                       param="max_tokens", code="context_length_exceeded")


async def run_job(scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams,
                  request: Request | None = None) -> AsyncIterator[Event]:
    """Events of one generation, ending after "done". Raises APIError on a full queue or a failure."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(list(prompt_ids), params, emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    try:
        scheduler.submit(job)
    except QueueFull as e:
        raise APIError(503, f"the server is at capacity ({e}); retry later") from None
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                continue
            if ev.kind == "error":
                if isinstance(ev.error, ContextOverflowError):
                    raise APIError(400, str(ev.error), code="context_length_exceeded")
                raise APIError(500, f"generation failed: {ev.error}")
            yield ev
            if ev.kind == "done":
                return
    finally:
        job.cancelled.set()  # no-op when it finished; frees the slot when the client left


async def complete(scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams,
                   request: Request | None = None) -> Completion:
    out = Completion()
    async for ev in run_job(scheduler, prompt_ids, params, request):
        if ev.kind == "delta":
            out.deltas.append(ev.delta)
        else:
            out.stats = ev.stats
    if out.stats is None:
        raise APIError(499, "the client closed the request")
    return out


async def build_output(scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams, request: Request | None,
                       parser, builder, opening: list[bytes], stream: bool):
    """Run a generation through a chat-output `parser` (reasoning / content / tool calls) into an API's
    `builder` (its `feed(event)` and `finish(stats)` return the streamed events and fill its result).
    Returns None once the builder's result is complete (not streaming), or the async iterator of SSE
    bytes, `opening` first. Errors before the first token (a full queue) raise here, as HTTP errors."""
    events = run_job(scheduler, prompt_ids, params, request)
    first = await anext(events)

    async def produce():
        ev = first
        while ev.kind != "done":
            for e in parser.feed(ev.delta.text):
                yield builder.feed(e)
            ev = await anext(events)
        for e in parser.finish():
            yield builder.feed(e)
        yield builder.finish(ev.stats)

    if not stream:
        async for _ in produce():
            pass
        return None

    async def sse():
        try:
            for part in opening:
                yield part
            async for chunk in produce():
                for part in chunk:
                    yield part
        finally:
            await events.aclose()

    return sse()
