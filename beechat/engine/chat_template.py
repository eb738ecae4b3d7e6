"""Chat templating with the GGUF's own Jinja template (tokenizer.chat_template).

Rendered like Hugging Face transformers does (trim_blocks, lstrip_blocks, loopcontrols, a
sandbox, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), so the prompt the
model sees is the one it was trained on. Models without a template get ChatML.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from beechat.events import ChatMessage

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(Exception):
    """The model's chat template failed to render; one-line message."""


class _IgnoreGeneration(jinja2.ext.Extension):
    """Pass-through for Hugging Face's `{% generation %}` tag."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension declares it this way)

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def alternating(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """`messages` with each run of same-role messages reduced to its last one.

    Many chat templates insist that user and assistant alternate. Two user messages follow each
    other when a reply was refused (the context was full under overflow = "stop"), failed, or was
    stopped before its first token: the store keeps both, the model sees only the newer one, so a
    message that was refused for its size does not block the next one.
    """
    out: list[ChatMessage] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"]:
            out[-1] = message
        else:
            out.append(message)
    return out


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        self.is_fallback = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
            extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not parse: {exc}") from exc

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )
        except TemplateError:
            raise
        except Exception as exc:  # a template bug must not take the app down
            raise TemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc
