"""The request front end: what turns a request into prompt ids and `SamplingParams`, with no model library.

`Engine`, the HTTP app and the Ray ingress (which holds no library and no GPU) share this one object, so the chat
template, the tokenizer's special tokens and the model's sampling defaults from mlc-chat-config.json are applied
the same way on every path, and a request's parameters are validated once, when its `SamplingParams` is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.runtime.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.runtime.tokenizer import Tokenizer

# Sampling fields whose default, when a request leaves them out, is the model's (mlc-chat-config.json).
MODEL_DEFAULTS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class RequestFrontend:
    """Tokenizer, chat template, vocabulary, stop tokens and sampling defaults of one model dir (read-only after
    construction, so any thread may use it)."""

    def __init__(self, model_dir: str | Path, config: ChatConfig | None = None,
                 context_window: int | None = None) -> None:
        """`context_window`: what requests may use (the engine's, bounded by its library); default the config's."""
        self.model_dir = Path(model_dir)
        self.config = config if config is not None else ChatConfig.load(self.model_dir)
        self.context_window = int(context_window or self.config.context_window_size)
        self.tokenizer = Tokenizer(self.model_dir)
        template = load_chat_template(self.model_dir)
        self.chat_template = ChatTemplate(template, self.tokenizer.template_variables()) if template else None
        self.vocab_size = self.config.vocab_size
        self.active_vocab = self.config.active_vocab_size or None
        eos = set(self.config.eos_token_ids)
        eos_text = self.tokenizer.special_tokens.get("eos_token")
        if eos_text is not None and self.tokenizer.token_to_id(eos_text) is not None:
            eos.add(self.tokenizer.token_to_id(eos_text))
        self.eos_token_ids = frozenset(eos)

    def sampling_params(self, **kw: Any) -> SamplingParams:
        """SamplingParams from keyword arguments; None (or left out) means the model's default from
        mlc-chat-config.json for `MODEL_DEFAULTS`, the dataclass default otherwise. Raises GenerationError naming
        the first bad field (SamplingParams validates itself once, when built)."""
        for name in MODEL_DEFAULTS:
            if kw.get(name) is None:
                kw[name] = getattr(self.config, name)
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None})

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for a conversation, through the model's chat template (special tokens come from it);
        `tools` are passed to templates that describe them."""
        if self.chat_template is None:
            raise ChatTemplateError(f"the tokenizer in {self.model_dir} has no chat_template; use raw prompts (--raw)")
        return self.tokenizer.encode(self.chat_template.render(messages, add_generation_prompt=True, tools=tools),
                                     add_special_tokens=False)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Text encoded with the tokenizer's special tokens (e.g. BOS); token ids as ints."""
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
