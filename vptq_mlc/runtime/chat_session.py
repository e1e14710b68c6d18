"""A multi-turn conversation on an Engine, and the interactive loop behind `vptq-mlc chat`.

Each turn re-renders the whole conversation with the chat template and prefills it again (no KV reuse across
turns: simple, and always what the template says). `raw` mode skips the template: every input is a
stand-alone completion prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from vptq_mlc.errors import VPTQMLCError
from vptq_mlc.runtime.engine import Engine

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


class ChatSession:
    """Conversation history + generation settings; `send` streams the assistant's reply."""

    def __init__(self, engine: Engine, raw: bool = False, system: str | None = None, **gen: Any) -> None:
        self.engine = engine
        self.raw = raw
        self.system = system
        self.gen = gen
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`; the turn is kept in the history only if the reply completes."""
        if self.raw:
            yield from self.engine.generate(text, stream=True, **self.gen)
            return
        messages = [*self.messages, {"role": "user", "content": text}]
        reply = []
        for delta in self.engine.chat(messages, stream=True, **self.gen):
            reply.append(delta)
            yield delta
        self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]


def write_stream(deltas: Iterator[str], out: TextIO) -> str:
    """Print text deltas as they arrive; return the whole text."""
    parts = []
    for d in deltas:
        out.write(d)
        out.flush()
        parts.append(d)
    return "".join(parts)


def interactive(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None,
                err: TextIO | None = None) -> None:
    """Read-eval-print loop: stream each reply; /reset, /exit; Ctrl-C stops the current reply."""
    out, err = out or sys.stdout, err or sys.stderr  # looked up per call: callers may swap the streams
    err.write(f"chat with {session.engine.model_dir.name} ({HELP})\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
            continue
        if cmd == "/help" or (cmd.startswith("/") and " " not in cmd):
            err.write(HELP + "\n")
            continue
        try:
            write_stream(session.send(line), out)
        except KeyboardInterrupt:
            err.write("\n(stopped)")
        except VPTQMLCError as e:
            err.write(f"error: {e}\n")
        out.write("\n")
