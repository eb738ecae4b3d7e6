"""The `beechat` command line. Contracts (names, flags, JSON keys, exit codes) are in PRODUCT.md
and docs/cli.md; scripts rely on them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beechat.config import Config, ConfigError, ModelFileError, load_config
from beechat.launch import load_backend, open_store, profile_status

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A one-line error for stderr."""


def _common(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    # Subcommands accept the options too; SUPPRESS keeps them from resetting a top-level value.
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument("--model", "-m", metavar="NAME", default=default,
                        help="profile from models.toml (default: its `default`)")
    parser.add_argument("--config", "-c", metavar="PATH", default=default,
                        help="models.toml to use (else $BEECHAT_CONFIG, ./models.toml, the user config dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beechat", description="Chat with local GGUF models: speculative "
                                     "decoding, quantized KV cache, live stats.")
    _common(parser, top_level=True)
    parser.add_argument("--plain", action="store_true", help="line mode instead of the TUI "
                                                            "(reads stdin line by line when it is not a terminal)")
    parser.add_argument("--no-save", action="store_true", help="do not save the conversation")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="reply length limit")
    parser.add_argument("--temperature", type=float, metavar="T")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--version", action="version", version=f"beechat {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="one reply to PROMPT (or stdin), saved unless --no-save")
    _common(ask)
    ask.add_argument("prompt", nargs="*", metavar="PROMPT", help="the prompt; '-' or absent reads stdin")
    ask.add_argument("--max-tokens", type=int, metavar="N", default=argparse.SUPPRESS)
    ask.add_argument("--temperature", type=float, metavar="T", default=argparse.SUPPRESS)
    ask.add_argument("--seed", type=int, metavar="S", default=argparse.SUPPRESS)
    ask.add_argument("--json", action="store_true", help="print one JSON object (text, model, stats...)")
    ask.add_argument("--no-save", action="store_true", default=argparse.SUPPRESS, help="do not save the exchange")

    models = sub.add_parser("models", help="list profiles and whether their files exist")
    _common(models)
    models.add_argument("--json", action="store_true")

    doctor = sub.add_parser("doctor", help="check GPU offload, files, vocabularies, cache types, memory")
    _common(doctor)
    doctor.add_argument("--json", action="store_true")

    plan = sub.add_parser("plan", help="how much context fits with each KV cache type")
    _common(plan)
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--memory", metavar="GIB", type=float, help="memory to plan for (default: free GPU/RAM)")

    bench = sub.add_parser("bench", help="plain vs speculative decoding on a fixed prompt set")
    _common(bench)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--max-tokens", type=int, default=128, metavar="N")
    bench.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per prompt and mode")

    export = sub.add_parser("export", help="write a conversation as Markdown, JSON or HTML")
    export.add_argument("conversation", metavar="CONVERSATION", help="id, 'last', or exact title")
    export.add_argument("--format", "-f", choices=("md", "json", "html"), default="md")
    export.add_argument("-o", "--output", metavar="PATH", help="file to write ('-' for stdout)")
    export.add_argument("--force", action="store_true", help="overwrite an existing file")

    conversations = sub.add_parser("conversations", help="list saved conversations")
    conversations.add_argument("--json", action="store_true")

    sub.add_parser("locate", help="print where beechat keeps its config, data and themes")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("beechat")
    except Exception:
        return "unknown"


def _exit_on_signals() -> None:
    """SIGTERM / SIGHUP end beechat through SystemExit, so atexit handlers (which stop managed
    servers) run; a SIGKILL cannot be caught, and loses at most the reply being streamed."""
    import signal

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or not supported here
            signal.signal(sig, leave)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _exit_on_signals()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("beechat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # every error ends as one line on stderr
        if os.environ.get("BEECHAT_DEBUG"):
            raise
        print(f"beechat: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    known = (ConfigError, ModelFileError, CLIError)
    text = str(exc) if isinstance(exc, known) else f"{exc}" or type(exc).__name__
    from beechat.backends.base import BackendError

    if not isinstance(exc, (*known, BackendError, OSError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return " ".join(text.split()) or type(exc).__name__


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "locate":
        return cmd_locate()
    if command == "export":
        return cmd_export(args)
    if command == "conversations":
        return cmd_conversations(args)
    config = load_config(args.config)
    if command == "ask":
        return cmd_ask(args, config)
    if command == "models":
        return cmd_models(args, config)
    if command == "doctor":
        from beechat.doctor import run_doctor

        return run_doctor(config, args.model, as_json=args.json)
    if command == "plan":
        from beechat.doctor import run_plan

        return run_plan(config, args.model, as_json=args.json, memory_gib=args.memory)
    if command == "bench":
        from beechat.bench import run_bench

        return run_bench(config.profile(args.model), as_json=args.json, max_tokens=args.max_tokens,
                         repeat=args.repeat)
    profile = config.profile(args.model)
    check_generation_options(args)
    if args.plain:
        from beechat.plain import run_plain

        return run_plain(config, profile, sampling_overrides(args), max_tokens=args.max_tokens,
                         save=not args.no_save)
    from beechat.tui.app import run_tui

    return run_tui(config, profile, save=not args.no_save, max_tokens=args.max_tokens,
                   sampling_overrides=sampling_overrides(args))


def check_generation_options(args: argparse.Namespace) -> None:
    """`--max-tokens` and `--temperature` values that cannot work are a one-line error."""
    max_tokens = getattr(args, "max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        raise CLIError("--max-tokens must be >= 1")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and temperature < 0:
        raise CLIError("--temperature must be >= 0")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": getattr(args, "temperature", None), "seed": getattr(args, "seed", None)}


def cmd_ask(args: argparse.Namespace, config: Config) -> int:
    from beechat.events import Chunk, Notice
    from beechat.session import ChatSession

    prompt = " ".join(args.prompt)
    if not args.prompt or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CLIError("empty prompt (give PROMPT, or text on stdin)")
    check_generation_options(args)
    profile = config.profile(args.model)
    sampling = profile.sampling.with_overrides(**sampling_overrides(args))
    backend, info = load_backend(profile, quiet=args.json)
    store = open_store(not args.no_save)
    try:
        session = ChatSession(backend, profile, store, model_info=info)
        stream_out = not args.json

        def on_event(event: object) -> None:
            if stream_out and isinstance(event, Chunk):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Notice):  # e.g. the prompt was cut to fit the context
                print(f"beechat: note: {event.message}", file=sys.stderr, flush=True)

        cancel = threading.Event()
        try:
            done = session.send(prompt, sampling, cancel, args.max_tokens, on_event)
        except KeyboardInterrupt:
            cancel.set()
            raise
    finally:
        backend.close()
        if store is not None:
            store.close()
    if args.json:
        draft = info.draft if info.speculation == "draft" else (
            info.speculation if info.speculation in ("ngram", "mtp") else None)
        print(json.dumps({
            "text": done.text, "model": profile.name, "draft": draft, "tokens": done.stats.tokens,
            "conversation": session.conversation_id, "stats": done.stats.contract_dict(),
            "finish_reason": done.finish_reason,
        }, ensure_ascii=False))
    elif not done.text.endswith("\n"):
        print()
    if done.finish_reason == "error" or (done.error and not done.text):
        print(f"beechat: error: {done.error or 'generation failed'}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    rows = [profile_status(p, p.name == config.default) for p in config.profiles.values()]
    if args.json:
        print(json.dumps({"config": config.source, "default": config.default, "profiles": rows}, indent=2))
        return EXIT_OK
    print(f"config: {config.source}")
    for row in rows:
        mark = "*" if row["default"] else " "
        files = ", ".join(f"{k} {'ok' if v['exists'] else 'MISSING'} ({v['path']})"
                          + (f" [MTP layers: {v['mtp_layers']}]" if v.get("mtp_layers") else "")
                          for k, v in row["files"].items())
        print(f"{mark} {row['name']:<18} {row['backend']:<8} {row['summary']}")
        if files:
            print(f"    {files}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from beechat.store import default_store
    from beechat.store.export import export_conversation, write_export

    store = default_store()
    try:
        conversation = store.get(store.resolve(args.conversation))
    finally:
        store.close()
    if args.output == "-":
        sys.stdout.write(export_conversation(conversation, args.format))
        return EXIT_OK
    path = write_export(conversation, args.format, Path(args.output) if args.output else None, overwrite=args.force)
    print(path)
    return EXIT_OK


def cmd_conversations(args: argparse.Namespace) -> int:
    import time

    from beechat.store import default_store

    store = default_store()
    try:
        rows = store.list_conversations()
    finally:
        store.close()
    if args.json:
        print(json.dumps([{"id": r.id, "title": r.title, "updated_at": r.updated_at, "messages": r.message_count,
                           "profile": r.profile} for r in rows], indent=2))
        return EXIT_OK
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated_at))
        print(f"{r.id:>5}  {when}  {r.message_count:>3} msgs  {r.title}")
    return EXIT_OK


def cmd_locate() -> int:
    from beechat import locations
    from beechat.config import find_config_file

    try:
        config = str(find_config_file() or "(none: built-in demo profile)")
    except ConfigError as exc:
        config = f"(error: {exc})"
    print(f"config:        {config}")
    print(f"user config:   {locations.user_config_file()}")
    print(f"database:      {locations.database_file()}")
    print(f"exports:       {locations.exports_dir()}")
    print(f"themes:        {locations.builtin_themes_dir()}  {locations.user_themes_dir()}")
    print(f"logs:          {locations.logs_dir()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
