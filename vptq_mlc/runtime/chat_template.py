"""Render a Hugging Face chat template (Jinja) the way `transformers`' `apply_chat_template` does.

Same environment: sandboxed, `trim_blocks` + `lstrip_blocks`, the loop-controls extension, a `tojson` that
does not HTML-escape, and the globals `raise_exception` and `strftime_now`. The special-token strings of
the tokenizer (bos_token, eos_token, ...) are template variables, overridable by keyword arguments.
The template is looked up where transformers saves it: `chat_template.jinja`, `chat_template.json`, or
`tokenizer_config.json["chat_template"]` (a string, or a list of named templates where "default" is used).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vptq_mlc.artifact.chat_config import read_json_object
from vptq_mlc.errors import VPTQMLCError


class ChatTemplateError(VPTQMLCError):
    """The template is missing, does not parse, or rejected the conversation (its `raise_exception`)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def load_chat_template(model_dir: str | Path, name: str | None = None) -> str | None:
    """The template text saved with the tokenizer, or None if the model has none."""
    model_dir = Path(model_dir)
    if name is None and (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    template: Any = None
    for fname in ("tokenizer_config.json", "chat_template.json"):  # later wins, as in transformers
        p = model_dir / fname
        if p.is_file():
            template = read_json_object(p, "copy the model's tokenizer files again").get("chat_template", template)
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        key = name or "default"
        if key not in named:
            raise ChatTemplateError(
                f"chat template {key!r} not found in {model_dir} (has: {', '.join(sorted(named))}); pick one of them"
            )
        return named[key]
    return template


class ChatTemplate:
    """A compiled chat template plus the tokenizer's special-token strings."""

    def __init__(self, source: str, variables: dict[str, Any] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"the chat template does not parse (line {e.lineno}: {e.message}); fix it or use --raw"
            ) from e
        self.source = source
        self.variables = dict(variables or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), ending with the assistant's turn header."""
        try:
            return self._template.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.variables, **kwargs},
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from e
