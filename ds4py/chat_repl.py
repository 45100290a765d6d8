"""`ds4py chat`: an interactive conversation in the V4 chat format. Thinking is shown dimmed; Ctrl-C
stops the current answer and keeps the session; Ctrl-D or /exit leaves. The cache of the previous
turn is reused when the new prompt extends it."""

from __future__ import annotations

import sys

from ds4py.chat import encode_chat, parse_output
from ds4py.engine import Model
from ds4py.generation import generate_text
from ds4py.sampling import SamplingParams
from ds4py.tokenizer import Tokenizer

DIM, RESET = "\033[2m", "\033[0m"


def chat_loop(model: Model, tokenizer: Tokenizer, params: SamplingParams, thinking: bool = False,
              system: str | None = None, speculative: bool = False) -> int:
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    cache = None
    tty = sys.stdout.isatty()
    print("ds4py chat: type a message; Ctrl-C stops an answer, Ctrl-D or /exit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = tokenizer.encode(encode_chat(messages, thinking=thinking))
        if cache is None or cache.tokens != prompt_ids[: cache.length] or cache.length >= len(prompt_ids):
            cache = model.new_cache()
        run = generate_text(model, tokenizer, prompt_ids, params, cache=cache, speculative=speculative)
        text, in_thought = "", thinking
        if in_thought and tty:
            sys.stdout.write(DIM)
        try:
            for delta in run:
                text += delta
                if in_thought and "</think>" in text:
                    in_thought = False
                    before, _, after = delta.partition("</think>")
                    sys.stdout.write(before + (RESET if tty else "") + "\n" + after.lstrip("\n"))
                else:
                    sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            cache = None  # the interrupted turn left the cache mid-answer
            sys.stdout.write((RESET if tty else "") + " [stopped]")
        if tty:
            sys.stdout.write(RESET)
        sys.stdout.write("\n")
        print(run.stats.summary(), file=sys.stderr)
        parsed = parse_output(text, thinking=thinking)
        messages.append({"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content})
