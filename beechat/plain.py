"""`beechat --plain`: line mode. prompt-toolkit on a terminal (history, multi-line with
Alt-Enter / Esc-Enter), plain line-by-line reading when stdin is a pipe. A stats line follows
every reply. Commands: /new, /model NAME, /stats, /quit."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

from beechat.config import Config, Profile
from beechat.events import Chunk, Done, Event, Notice
from beechat.format import stats_line

CUT_MARK = " [cut: the reply reached the end of the context]"
HELP = "commands: /new (new conversation), /model NAME (switch profile), /models, /quit; Alt-Enter for a newline"


def _terminal_lines() -> Iterator[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    from beechat import locations

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    locations.data_dir().mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(locations.data_dir() / "plain_history")), key_bindings=bindings,
        multiline=False,
    )
    while True:
        try:
            yield session.prompt("you> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return


def _piped_lines() -> Iterator[str]:
    for line in sys.stdin:
        yield line.rstrip("\n")


def run_plain(config: Config, profile: Profile, overrides: dict[str, Any], max_tokens: int | None = None,
              save: bool = True) -> int:
    from beechat.launch import load_backend, open_store
    from beechat.session import ChatSession

    interactive = sys.stdin.isatty()
    backend, info = load_backend(profile, quiet=not interactive)
    for note in info.notes:
        print(f"note: {note}", file=sys.stderr)
    store = open_store(save)
    session = ChatSession(backend, profile, store, model_info=info)
    failures = 0
    if interactive:
        print(f"beechat plain mode on {profile.name} ({profile.describe()}). {HELP}")
    try:
        for line in (_terminal_lines() if interactive else _piped_lines()):
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, arg = text.partition(" ")
                if command in ("/quit", "/exit"):
                    break
                if command == "/new":
                    session = ChatSession(session.backend, session.profile, store, model_info=session.model_info)
                    print("(new conversation)")
                    continue
                if command == "/models":
                    for name in config.profiles:
                        print(("* " if name == session.profile.name else "  ") + name)
                    continue
                if command == "/model":
                    try:
                        new_profile = config.profile(arg.strip())
                    except Exception as exc:  # an unknown name: keep the model we have
                        print(f"error: {exc}", file=sys.stderr)
                        continue
                    session.backend.close()  # free the old model's memory first
                    try:
                        new_backend, new_info = load_backend(new_profile, quiet=not interactive)
                    except Exception as exc:
                        print(f"error: {exc}; reloading {session.profile.name}", file=sys.stderr)
                        new_backend, new_info = load_backend(session.profile, quiet=not interactive)
                        new_profile = session.profile
                    session.switch_backend(new_backend, new_profile, new_info)
                    print(f"(model: {new_profile.name})")
                    continue
                if command == "/help":
                    print(HELP)
                    continue
            sampling = session.profile.sampling.with_overrides(**overrides)
            cancel = threading.Event()
            print("bee> " if interactive else "", end="", flush=True)
            done = _send_interruptibly(session, text, sampling, cancel, max_tokens)
            if not done.text.endswith("\n"):
                print()
            if done.error:
                failures += 1
                print(f"error: {done.error}", file=sys.stderr)
            print(f"[{stats_line(done.stats)}]", flush=True)
    finally:
        session.backend.close()
        if store is not None:
            store.close()
    return 1 if failures and not interactive else 0


def _send_interruptibly(session: Any, text: str, sampling: Any, cancel: threading.Event,
                        max_tokens: int | None) -> Done:
    """Generate on a worker thread so Ctrl-C only sets `cancel` (an interrupt inside a llama.cpp
    call would leave the engine's view of its cache wrong); the partial reply is kept."""
    result: list[Done] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(session.send(text, sampling, cancel, max_tokens, _printer()))
        except BaseException as exc:  # re-raised on the main thread
            errors.append(exc)

    worker = threading.Thread(target=work, name="beechat-generate", daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            cancel.set()
    if errors:
        raise errors[0]
    return result[0]


def _printer() -> Any:
    def on_event(event: Event) -> None:
        if isinstance(event, Chunk):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Notice):
            print(f"\n(note: {event.message})", file=sys.stderr)
        elif isinstance(event, Done) and event.finish_reason == "cancelled":
            sys.stdout.write(" [stopped]")
        elif isinstance(event, Done) and event.finish_reason == "context" and event.text:
            sys.stdout.write(CUT_MARK)

    return on_event
