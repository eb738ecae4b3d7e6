"""Transcripts of a saved conversation as Markdown, JSON or HTML (docs/export.md).

Every assistant reply carries its stats, model and sampling settings; a value that is not known
is shown as "n/a", never as a made-up zero. A reply's reasoning is set apart from its answer, as
the store keeps them (no text is parsed here).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import time
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from beechat import locations
from beechat.format import human_bytes
from beechat.store.db import json_safe
from beechat.store.records import Conversation, StoredMessage

ExportFormat = Literal["md", "json", "html"]
EXPORT_FORMATS: Final[tuple[ExportFormat, ...]] = ("md", "json", "html")
TRANSCRIPT_FORMAT: Final = "beechat-transcript"
TRANSCRIPT_VERSION: Final = 1
NOT_AVAILABLE: Final = "n/a"
CONTEXT_CUT_NOTE: Final = "Cut: the reply reached the end of the context"
FILENAME_STEM_MAX_BYTES: Final = 80

ROLE_HEADINGS: Final = {"system": "System", "user": "User", "assistant": "Assistant"}
SAMPLING_ORDER: Final = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                         "seed", "max_tokens")
_RESERVED_NAMES: Final = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{n}" for n in range(10)), *(f"lpt{n}" for n in range(10))}
)
_FILENAME_FORBIDDEN: Final = frozenset('<>:"/\\|?*')

Field = tuple[str, str]  # (label, value as shown)


# ----------------------------------------------------------------------------------------------
# Public API


def export_conversation(conv: Conversation, fmt: ExportFormat) -> str:
    """The whole transcript of `conv` as text in format `fmt`."""
    if fmt == "md":
        return _markdown(conv)
    if fmt == "json":
        return json.dumps(transcript_dict(conv), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    if fmt == "html":
        return _html(conv)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")


def write_export(conv: Conversation, fmt: ExportFormat, path: Path | None = None, *,
                 overwrite: bool = False) -> Path:
    """Write the transcript and return where; an existing file is kept unless `overwrite`.

    `path` None means the exports directory; a directory means a generated name inside it.
    """
    text = export_conversation(conv, fmt)
    if path is None:
        target = locations.exports_dir() / safe_filename(conv.title, conv.id, fmt)
    else:
        target = Path(path).expanduser()
        if target.is_dir():
            target = target / safe_filename(conv.title, conv.id, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with target.open("w" if overwrite else "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
    except FileExistsError:
        raise FileExistsError(f"{target} already exists; not overwriting it "
                              "(choose another path or allow overwriting)") from None
    return target


def safe_filename(title: str | None, conversation_id: int, ext: str) -> str:
    """`TITLE-ID.EXT`, safe on every common filesystem: no separators, control characters,
    reserved device names, leading dots or dashes; the title part at most 80 UTF-8 bytes."""
    text = unicodedata.normalize("NFC", title or "")
    text = "".join(
        " " if ch in _FILENAME_FORBIDDEN or unicodedata.category(ch).startswith("C") else ch
        for ch in text
    )
    stem = "-".join(text.split())
    stem = stem.encode("utf-8")[:FILENAME_STEM_MAX_BYTES].decode("utf-8", errors="ignore")
    stem = stem.strip(" .-")
    if not stem or stem.split(".")[0].lower() in _RESERVED_NAMES:
        stem = "conversation"
    suffix = re.sub(r"[^A-Za-z0-9]", "", ext) or "txt"
    return f"{stem}-{conversation_id}.{suffix}"


def reasoning_and_answer(message: StoredMessage) -> tuple[str | None, str]:
    """(reasoning, answer) of a message as a transcript shows them; reasoning is None when the
    message has none, else both lose the whitespace around them (the newlines by the markup)."""
    if message.reasoning is None:
        return None, message.answer
    return message.reasoning.strip(), message.answer.strip()


def transcript_dict(conv: Conversation) -> dict[str, Any]:
    """The JSON transcript as a dict (full fidelity; schema in docs/export.md)."""
    return {
        "format": TRANSCRIPT_FORMAT,
        "version": TRANSCRIPT_VERSION,
        "exported_at": time.time(),
        "id": conv.id,
        "title": conv.title,
        "created_at": conv.created_at,
        "updated_at": conv.updated_at,
        "profile": conv.profile,
        "messages": [_message_dict(message) for message in conv.messages],
    }


# ----------------------------------------------------------------------------------------------
# What a reply shows, shared by Markdown and HTML


def stats_fields(stats: Mapping[str, Any] | None, finish_reason: str | None = None) -> list[Field]:
    """Labelled, formatted stats of one reply; unknown values are "n/a"."""
    values = dict(stats or {})
    drafted, accepted, passes = values.get("drafted"), values.get("accepted"), values.get("passes")
    acceptance = values.get("acceptance")
    if "acceptance" not in values and _is_number(drafted) and _is_number(accepted) and drafted:
        acceptance = accepted / drafted
    mean_accepted_len = values.get("mean_accepted_len")
    if "mean_accepted_len" not in values and _is_number(accepted) and _is_number(passes) and passes:
        mean_accepted_len = 1.0 + accepted / passes
    tokens = _integer(values.get("tokens"))
    if values.get("estimated") and tokens != NOT_AVAILABLE:
        tokens += " (estimated)"
    return [
        ("decode", _rate(values.get("decode_tps"))),
        ("prefill", _rate(values.get("prefill_tps"))),
        ("acceptance", _percent(acceptance)),
        ("mean accepted length", _decimal(mean_accepted_len, 2)),
        ("drafted/accepted", _pair(_integer(drafted), _integer(accepted), "/")
         + (f" ({values['draft_source']})" if values.get("draft_source") and drafted is not None else "")),
        ("KV cache", _pair(_bytes(values.get("kv_bytes")), _bytes(values.get("kv_bytes_capacity")), " / ")),
        ("context", _pair(_integer(values.get("ctx_used")), _integer(values.get("ctx_size")), " / ")),
        ("tokens", tokens),
        ("elapsed", _seconds(values.get("elapsed_s"))),
        ("finish", finish_reason or NOT_AVAILABLE),
    ]


def model_fields(message: StoredMessage) -> list[Field]:
    """Profile, target, draft, speculation, KV cache types and n_ctx of one reply."""
    info = message.model_info or {}
    stats = message.stats or {}
    cache_k = info.get("cache_type_k") or stats.get("cache_type_k")
    cache_v = info.get("cache_type_v") or stats.get("cache_type_v")
    return [
        ("profile", _plain(message.profile or info.get("profile"))),
        ("target", _model_name(info.get("target"))),
        ("draft", _model_name(info.get("draft"))),
        ("speculation", _plain(info.get("speculation"))),
        ("KV cache types", _pair(_plain(cache_k), _plain(cache_v), "/")),
        ("n_ctx", _integer(info.get("n_ctx"))),
    ]


def sampling_fields(sampling: Mapping[str, Any] | None) -> list[Field]:
    """Sampling settings in a fixed order, then any others alphabetically; none when not saved."""
    if sampling is None:
        return []
    known = [key for key in SAMPLING_ORDER if key in sampling]
    extra = sorted(key for key in sampling if key not in SAMPLING_ORDER)
    return [(key, _plain(sampling[key])) for key in (*known, *extra)]


# ----------------------------------------------------------------------------------------------
# Markdown


def _markdown(conv: Conversation) -> str:
    lines = [f"# {conv.display_title}", "", "*" + _md_inline(" · ".join(_conversation_meta(conv))) + "*", ""]
    for message in conv.messages:
        lines.extend(_markdown_message(message))
    return "\n".join(lines).rstrip("\n") + "\n"


def _markdown_message(message: StoredMessage) -> list[str]:
    heading = ROLE_HEADINGS[message.role]
    if message.role != "assistant":
        return [f"## {heading}", "", message.content, ""]
    cut = _cut_by_context(message)
    lines = [f"## {heading}" + ("" if message.complete else " (partial)") + (" (cut)" if cut else ""), ""]
    if not message.complete:
        lines += ["*Partial reply: generation did not finish (interrupted or still streaming).*", ""]
    if cut:
        lines += [f"*{CONTEXT_CUT_NOTE}.*", ""]
    reasoning, answer = reasoning_and_answer(message)
    if reasoning:
        marker = "> **Reasoning**" + (" (unfinished)" if message.reasoning_open else "")
        lines += [marker, ">"]
        lines += [f"> {line}" if line else ">" for line in reasoning.splitlines()]
        lines.append("")
    if answer:
        lines += [answer, ""]
    lines += [
        "*" + _md_inline("stats: " + _joined(stats_fields(message.stats, message.finish_reason))) + "*", "",
        "*" + _md_inline("model: " + _joined(model_fields(message))) + "*", "",
        "*" + _md_inline("sampling: " + _joined(sampling_fields(message.sampling))) + "*", "",
    ]
    return lines


_MD_MARKUP: Final = re.compile(r"[\\`*\[\]<>~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def _md_inline(text: str) -> str:
    """Escape Markdown markup so `text` reads literally inside an italic line."""
    return _MD_MARKUP.sub(lambda match: "\\" + match.group(0), " ".join(text.split()))


def _joined(fields: list[Field]) -> str:
    return " · ".join(f"{label} {value}" for label, value in fields) or NOT_AVAILABLE


# ----------------------------------------------------------------------------------------------
# HTML

_CSS: Final = """
:root { color-scheme: light dark; --fg: #1f2328; --bg: #ffffff; --muted: #59636e; --line: #d1d9e0;
        --user: #ddf4ff; --assistant: #f6f8fa; --system: #fff8c5; --partial: #bc4c00; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9198a1; --line: #3d444d;
          --user: #0c2d6b; --assistant: #151b23; --system: #3b2e00; --partial: #f0883e; }
}
body { margin: 0 auto; max-width: 52rem; padding: 1.5rem; color: var(--fg); background: var(--bg);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { margin: 0 0 .25rem; font-size: 1.5rem; }
.meta, .fields { color: var(--muted); font-size: .85rem; }
.message { border: 1px solid var(--line); border-radius: 8px; padding: .75rem 1rem; margin: 1rem 0; }
.message.user { background: var(--user); }
.message.assistant { background: var(--assistant); }
.message.system { background: var(--system); }
.message h2 { margin: 0 0 .5rem; font-size: 1rem; }
.badge { color: var(--partial); font-weight: normal; font-size: .85rem; margin-left: .5rem; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular,
        Menlo, Consolas, monospace; font-size: .9rem; }
details.reasoning { border-left: 3px solid var(--line); padding-left: .75rem; margin: 0 0 .75rem; }
details.reasoning summary { cursor: pointer; color: var(--muted); font-style: italic; }
.fields { margin: .5rem 0 0; padding: 0; list-style: none; }
.fields li { display: inline; }
.fields li + li::before { content: " · "; }
.fields .group { font-weight: 600; }
"""


def _html(conv: Conversation) -> str:
    esc = _escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="beechat">',
        f"<title>{esc(conv.display_title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{esc(conv.display_title)}</h1>",
        f'<p class="meta">{esc(" · ".join(_conversation_meta(conv)))}</p>',
        "</header>",
        "<main>",
    ]
    for message in conv.messages:
        parts.extend(_html_message(message))
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _html_message(message: StoredMessage) -> list[str]:
    esc = _escape
    classes = f"message {message.role}" + ("" if message.complete else " partial")
    badge = "" if message.complete else ' <span class="badge">partial: generation did not finish</span>'
    if _cut_by_context(message):
        badge += f' <span class="badge">{esc(CONTEXT_CUT_NOTE)}</span>'
    parts = [f'<article class="{classes}" id="message-{message.id}">',
             f"<h2>{esc(ROLE_HEADINGS[message.role])}{badge}</h2>"]
    if message.role != "assistant":
        parts += [f'<div class="text">{esc(message.content)}</div>', "</article>"]
        return parts
    reasoning, answer = reasoning_and_answer(message)
    if reasoning:
        summary = "Reasoning" + (" (unfinished)" if message.reasoning_open else "")
        parts.append(f'<details class="reasoning"><summary>{summary}</summary>'
                     f'<div class="text">{esc(reasoning)}</div></details>')
    if answer:
        parts.append(f'<div class="text">{esc(answer)}</div>')
    for group, fields in (("stats", stats_fields(message.stats, message.finish_reason)),
                          ("model", model_fields(message)),
                          ("sampling", sampling_fields(message.sampling))):
        items = "".join(f"<li>{esc(label)} {esc(value)}</li>" for label, value in fields)
        items = items or f"<li>{NOT_AVAILABLE}</li>"
        parts.append(f'<ul class="fields {group}"><li class="group">{group}</li>{items}</ul>')
    parts.append("</article>")
    return parts


def _cut_by_context(message: StoredMessage) -> bool:
    """A reply that stopped because it reached the end of the model's context."""
    return message.role == "assistant" and message.finish_reason == "context" and bool(message.content)


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


# ----------------------------------------------------------------------------------------------
# Formatting helpers


def _conversation_meta(conv: Conversation) -> list[str]:
    return [
        f"beechat conversation {conv.id}",
        f"created {_timestamp(conv.created_at)}",
        f"updated {_timestamp(conv.updated_at)}",
        f"profile {_plain(conv.profile)}",
        f"{len(conv.messages)} messages",
    ]


def _message_dict(message: StoredMessage) -> dict[str, Any]:
    data: dict[str, Any] = json_safe(dataclasses.asdict(message))
    del data["reasoning_open"]  # the transcript format (docs/export.md) has no such key
    data["reasoning"], data["answer"] = reasoning_and_answer(message)
    return data


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plain(value: Any) -> str:
    if value is None or value == "":
        return NOT_AVAILABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _model_name(ref: Any) -> str:
    """A model file's name without its directories (full paths stay in the JSON export)."""
    if not ref:
        return NOT_AVAILABLE
    text = str(ref)
    return text.replace("\\", "/").rsplit("/", 1)[-1] if text.endswith(".gguf") else text


def _integer(value: Any) -> str:
    return f"{round(value):,}" if _is_number(value) else _plain(value)


def _decimal(value: Any, places: int) -> str:
    return f"{value:.{places}f}" if _is_number(value) else _plain(value)


def _rate(value: Any) -> str:
    return f"{value:,.1f} tok/s" if _is_number(value) else _plain(value)


def _percent(value: Any) -> str:
    return f"{value * 100:.1f}%" if _is_number(value) else _plain(value)


def _seconds(value: Any) -> str:
    return f"{value:.2f} s" if _is_number(value) else _plain(value)


def _bytes(value: Any) -> str:
    return human_bytes(value) if _is_number(value) else _plain(value)


def _pair(first: str, second: str, separator: str) -> str:
    if first == NOT_AVAILABLE and second == NOT_AVAILABLE:
        return NOT_AVAILABLE
    return f"{first}{separator}{second}"
