"""Every shape of long chat, one by one, on a tiny real GGUF (SmolLM2's tokenizer and template,
random weights: a reply runs as long as max_tokens and the context allow).

The issue's case (truncate-middle and drop-oldest, n_ctx 512, six long messages piped into
`beechat --plain`), a first exchange that alone fills the context, a reply that reaches the end of
the context, one message longer than the whole context, a mid-chat switch to a smaller n_ctx, a
system prompt too big for n_ctx, the reply reserve, KV prefix reuse after a cut (prefill tokens per
turn), and the marks a cut reply leaves in exports and `ask`.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beechat.backends.base import BackendError
from beechat.backends.embedded import EmbeddedBackend
from beechat.config import ConfigError, EmbeddedSettings, Profile, Sampling, parse_config
from beechat.engine.chat import ChatEngine, EngineError
from beechat.events import ChatMessage, Done, Event, Notice
from beechat.plain import CUT_MARK
from beechat.session import ChatSession
from beechat.store import Store, default_store
from beechat.store.export import export_conversation
from tests.gguf_factory import write_llama
from tests.support import flat_profile
from tests.test_cli import beechat

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
SYSTEM = "You are a helpful assistant."
TOPICS = ("rivers", "mountains", "bread", "trains", "music", "gardens")
# the messages: each about 150 tokens, so one exchange with a reply to the context end fills 512
ESSAYS = [(f"Please write a long and detailed essay about {t}. "
          + f"Cover the history of {t}, how {t} changed over the centuries, why people care about {t}, "
            f"and what the future holds for {t}. " * 4).strip() for t in TOPICS]
POLICIES = ("stop", "drop-oldest", "truncate-middle")
TO_THE_END = 100_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_layer=1, n_embd=32, head_seed=21,
                       layer_seed=22)


def profile(model: Path, overflow: str = "drop-oldest", n_ctx: int = 256, **extra: Any) -> Profile:
    fields: dict[str, Any] = {"system_prompt": SYSTEM, "n_threads": 1, "sampling": GREEDY}
    fields.update(extra)
    return flat_profile(f"tiny-{overflow}-{n_ctx}", target=str(model), n_ctx=n_ctx, overflow=overflow, **fields)


@pytest.fixture(scope="module")
def backends(tiny: Path) -> Iterator[dict[tuple[str, int], EmbeddedBackend]]:
    """One loaded backend per (policy, n_ctx), reset by each test that uses it."""
    made: dict[tuple[str, int], EmbeddedBackend] = {}
    try:
        for policy, n_ctx in itertools.product(POLICIES, (256, 512)):  # llama.cpp pads n_ctx to 256s
            made[policy, n_ctx] = EmbeddedBackend(profile(tiny, policy, n_ctx))
            made[policy, n_ctx].load()
        yield made
    finally:
        for backend in made.values():
            backend.close()


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "conversations.sqlite3") as opened:
        yield opened


def session_on(backends: dict[tuple[str, int], EmbeddedBackend], policy: str, n_ctx: int,
               store: Store) -> ChatSession:
    backend = backends[policy, n_ctx]
    backend.reset()
    return ChatSession(backend, backend.profile, store, model_info=backend.info())


def say(session: ChatSession, text: str, max_tokens: int = 8) -> tuple[Done, list[str]]:
    notices: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Notice):
            notices.append(event.message)

    return session.send(text, GREEDY, threading.Event(), max_tokens, on_event), notices


def rendered(engine: ChatEngine, tokens: list[int]) -> str:
    return b"".join(engine.model.piece(t) for t in tokens).decode("utf-8", "replace")


def engine_of(session: ChatSession) -> ChatEngine:
    backend = session.backend
    assert isinstance(backend, EmbeddedBackend) and backend.engine is not None
    return backend.engine


def assert_one_line_fix(error: str | None) -> None:
    assert error is not None and "\n" not in error, error
    assert "start a new conversation" in error and "raise n_ctx" in error, error


def assert_stored_whole(store: Store, session: ChatSession, user_texts: list[str]) -> None:
    assert session.conversation_id is not None
    stored = [m for m in store.chat_messages(session.conversation_id) if m["role"] != "system"]
    assert stored == session.messages
    assert [m["content"] for m in stored if m["role"] == "user"] == user_texts


# ----------------------------------------------------------------------------------------------
# The case, end to end


@pytest.mark.parametrize("policy", ["truncate-middle", "drop-oldest"])
def test_six_long_messages_piped_into_plain_mode_all_get_replies(tiny: Path, tmp_path: Path, policy: str) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.long]\ntarget = "{tiny}"\nn_ctx = 512\nn_threads = 1\noverflow = "{policy}"\n'
                      f'system_prompt = "{SYSTEM}"\n[models.long.sampling]\ntemperature = 0.0\n')
    result = beechat("--config", str(config), "--plain", stdin="\n".join(ESSAYS) + "\n")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("[decode")]) == 6
    store = default_store()
    try:
        conversation = store.get(store.resolve("last"))
    finally:
        store.close()
    replies = [m for m in conversation.messages if m.role == "assistant"]
    assert [m.content for m in conversation.messages if m.role == "user"] == ESSAYS
    assert [m.role for m in conversation.messages] == ["user", "assistant"] * 6
    assert len(replies) == 6 and all(m.content and m.complete for m in replies)
    # the replies run to the end of the context (the case that used to dead-end) and say so
    cut = [m for m in replies if m.finish_reason == "context"]
    assert len(cut) >= 5, [m.finish_reason for m in replies]
    assert result.stdout.count(CUT_MARK) == len(cut)
    assert result.stderr.count("reply cut: it reached the end of the context") == len(cut)
    assert result.stderr.count("context full: left out") >= 4


# ----------------------------------------------------------------------------------------------
# Each shape, under each policy


@pytest.mark.parametrize("policy", POLICIES)
def test_a_first_exchange_that_alone_fills_the_context(backends: dict[tuple[str, int], EmbeddedBackend],
                                                       policy: str) -> None:
    engine = backends[policy, 256].engine
    assert engine is not None
    engine.reset()
    long_reply = " ".join(f"fact{i}" for i in range(400))  # far more than the context
    messages: list[ChatMessage] = [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me everything."},
        {"role": "assistant", "content": long_reply}, {"role": "user", "content": "Shorter please."},
        {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "What is two plus two?"},
    ]
    if policy == "stop":
        with pytest.raises(EngineError) as refused:
            engine.fit(messages, reserve=64)
        assert_one_line_fix(str(refused.value))
        return
    tokens, notice = engine.fit(messages, reserve=64)
    text = rendered(engine, tokens)
    assert len(tokens) <= 256 - 64 and "What is two plus two?" in text and "fact7 " not in text
    assert notice is not None and "left out" in notice and "stay in the conversation" in notice
    if policy == "truncate-middle":
        assert "the first exchange too" in notice
    reply = next(e for e in engine.generate(messages, GREEDY, threading.Event(), 8) if isinstance(e, Done))
    assert reply.finish_reason == "length" and reply.text and reply.error is None


@pytest.mark.parametrize("policy", POLICIES)
def test_a_reply_that_reaches_the_context_end_says_so_and_the_chat_goes_on(
        backends: dict[tuple[str, int], EmbeddedBackend], store: Store, policy: str) -> None:
    session = session_on(backends, policy, 256, store)
    done, notices = say(session, "Write forever about rivers.", TO_THE_END)
    assert done.finish_reason == "context" and done.text and done.error is None
    assert done.stats.ctx_used == 256
    assert notices == ["reply cut: it reached the end of the context (256 tokens); "
                       + ("start a new conversation or raise n_ctx to go on" if policy == "stop"
                          else "the next turn leaves out older messages for the model")]
    assert session.conversation_id is not None
    stored = store.get(session.conversation_id).messages[-1]
    assert stored.finish_reason == "context" and stored.content == done.text and stored.complete
    done, notices = say(session, "And now?")
    if policy == "stop":  # refused in one line that says what to do
        assert done.finish_reason == "context" and not done.text
        assert_one_line_fix(done.error)
        assert "context full" in done.error  # type: ignore[operator]
    else:
        assert done.finish_reason == "length" and done.text and done.error is None
        assert notices and notices[0].startswith("context full: left out the 2")
    assert_stored_whole(store, session, ["Write forever about rivers.", "And now?"])


@pytest.mark.parametrize("policy", POLICIES)
def test_a_message_longer_than_the_context_is_cut_or_refused_and_the_chat_goes_on(
        backends: dict[tuple[str, int], EmbeddedBackend], store: Store, policy: str) -> None:
    session = session_on(backends, policy, 256, store)
    engine = engine_of(session)
    say(session, "Hello there.")
    huge = "START " + " ".join(f"word{i}" for i in range(1500)) + " THE END"
    prompts: list[list[int]] = []
    prefill = engine.generator.prefill

    def spy(prompt: list[int], cancel: threading.Event | None = None, *args: Any) -> int:  # what the model gets
        prompts.append(list(prompt))
        return prefill(prompt, cancel, *args)

    engine.generator.prefill = spy  # type: ignore[assignment]
    try:
        done, notices = say(session, huge)
        if policy == "stop":
            assert done.finish_reason == "context" and not done.text and not prompts
            assert_one_line_fix(done.error)
        else:
            assert done.finish_reason == "length" and done.text and done.error is None
            assert len(notices) == 1 and "the newest message is longer than the context" in notices[0], notices
            found = re.search(r"the model sees only its last (\d+) of (\d+) tokens", notices[0])
            assert found is not None and int(found[2]) == engine.count_tokens(huge)
            assert 16 <= int(found[1]) < 256 - engine.reply_reserve(8)
            seen = rendered(engine, prompts[-1])
            assert "THE END" in seen and "[…] " in seen and "START" not in seen and "Hello there." not in seen
            assert len(prompts[-1]) <= 256 - engine.reply_reserve(8)
        # the next short message gets a reply under every policy: a refused message does not block it
        done, _ = say(session, "Short question?")
        assert done.finish_reason == "length" and done.text and done.error is None
        seen = rendered(engine, prompts[-1])
        assert "Short question?" in seen and "word1000" not in seen
    finally:
        engine.generator.prefill = prefill  # type: ignore[method-assign]
    assert_stored_whole(store, session, ["Hello there.", huge, "Short question?"])  # the huge one kept whole


@pytest.mark.parametrize("policy", POLICIES)
def test_a_switch_to_a_smaller_context_mid_chat(backends: dict[tuple[str, int], EmbeddedBackend], store: Store,
                                                policy: str) -> None:
    session = session_on(backends, "drop-oldest", 512, store)
    texts = [f"Question {i}: " + ESSAYS[i % 6] for i in range(3)]
    for text in texts:
        done, _ = say(session, text, 40)
        assert done.text
    smaller = backends[policy, 256]
    smaller.reset()
    session.switch_backend(smaller, smaller.profile, smaller.info())
    done, notices = say(session, "Still there?")
    if policy == "stop":
        assert done.finish_reason == "context" and not done.text
        assert_one_line_fix(done.error)
    else:
        assert done.finish_reason == "length" and done.text and done.error is None
        assert notices and notices[0].startswith("context full: left out the 6")
        assert done.stats.prompt_tokens is not None and done.stats.prompt_tokens <= 256 - 8
    assert_stored_whole(store, session, [*texts, "Still there?"])


def test_a_system_prompt_too_big_for_n_ctx_is_a_load_error_naming_the_profile(tiny: Path) -> None:
    big = profile(tiny, n_ctx=256, system_prompt="Remember this. " * 60)
    backend = EmbeddedBackend(big)
    with pytest.raises(BackendError) as failed:
        backend.load()
    message = str(failed.value)
    assert message.startswith(f"profile {big.name!r}: the system_prompt takes ") and "\n" not in message
    assert "n_ctx = 256" in message and "shorten system_prompt, raise n_ctx or lower reply_reserve" in message
    assert backend.engine is None
    # the same prompt fits a larger context
    fits = EmbeddedBackend(profile(tiny, n_ctx=512, system_prompt="Remember this. " * 60))
    try:
        fits.load()
    finally:
        fits.close()


def test_a_system_prompt_too_big_stops_ask_with_one_line(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.big]\ntarget = "{tiny}"\nn_ctx = 256\nn_threads = 1\n'
                      f'system_prompt = "{"Remember this. " * 60}"\n')
    result = beechat("--config", str(config), "ask", "Hi")
    assert result.returncode == 1
    assert result.stderr.startswith("beechat: error: profile 'big': the system_prompt takes ")
    assert result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The reserve


def test_reply_reserve_is_freed_before_each_turn(tiny: Path, store: Store) -> None:
    backend = EmbeddedBackend(profile(tiny, n_ctx=256, reply_reserve=200))
    backend.load()
    try:
        engine = backend.engine
        assert engine is not None
        assert engine.reply_reserve(1024) == 200 and engine.reply_reserve(50) == 50  # never above max_tokens
        session = ChatSession(backend, backend.profile, store)
        for i in range(4):
            done, _ = say(session, f"Message {i}: " + ESSAYS[i][:200], 1024)
            # the prompt always left the whole reserve free, so every reply had room to answer
            assert done.stats.prompt_tokens is not None and done.stats.prompt_tokens <= 256 - 200
            assert done.stats.tokens >= 200 - 1 or done.finish_reason == "stop"
    finally:
        backend.close()
    # the default is a quarter of the context, capped by max_tokens
    default = EmbeddedBackend(profile(tiny, n_ctx=256))
    default.load()
    try:
        assert default.engine is not None
        assert default.engine.reply_reserve(1024) == 64 and default.engine.reply_reserve(10) == 10
    finally:
        default.close()


def test_reply_reserve_in_models_toml(tmp_path: Path) -> None:
    base = '[models.a]\ntarget = "a.gguf"\nn_ctx = 512\n'
    config = parse_config(base + "reply_reserve = 256\n", tmp_path / "models.toml")
    assert config.profile("a").embedded.reply_reserve == 256
    assert parse_config(base, tmp_path / "models.toml").profile("a").embedded.reply_reserve is None
    with pytest.raises(ConfigError, match=r"models.toml:4: models.a.reply_reserve: expected an integer >= 1, got 0"):
        parse_config(base + "reply_reserve = 0\n", tmp_path / "models.toml")
    with pytest.raises(ConfigError, match=r"reply_reserve: expected at most n_ctx - 16 \(496\) .* got 500"):
        parse_config(base + "reply_reserve = 500\n", tmp_path / "models.toml")


def test_a_reserve_larger_than_an_auto_context_is_a_load_error(tiny: Path) -> None:
    # (the parser catches this for a fixed n_ctx; with n_ctx = "auto" only the load can)
    with pytest.raises(EngineError, match=r"^reply_reserve = 250 leaves no room for a message in n_ctx = 256; "):
        ChatEngine(EmbeddedSettings(target=str(tiny), n_ctx=256, n_threads=1, reply_reserve=250))


# ----------------------------------------------------------------------------------------------
# Cheap cuts


def test_after_a_cut_the_kv_prefix_is_reused(backends: dict[tuple[str, int], EmbeddedBackend], store: Store) -> None:
    """Prefill tokens per turn: a cut re-evaluates the kept messages once; the turns after it only
    evaluate the newest reply and message."""
    session = session_on(backends, "drop-oldest", 512, store)
    engine = engine_of(session)
    rows: list[tuple[int, int, bool, int]] = []  # (prompt tokens, prefill tokens, cut, new tokens)
    for i in range(16):
        last_reply = session.messages[-1]["content"] if session.messages else ""
        text = f"Turn {i}. " + ESSAYS[i % 6][:250]
        done, notices = say(session, text, 24)
        assert done.text and done.error is None
        assert done.stats.prompt_tokens is not None and done.stats.prefill_tokens is not None
        new = engine.count_tokens(last_reply) + engine.count_tokens(text)
        rows.append((done.stats.prompt_tokens, done.stats.prefill_tokens, bool(notices), new))
    cuts = [i for i, row in enumerate(rows) if row[2]]
    assert len(cuts) >= 2, rows  # the conversation is several contexts long
    assert len(cuts) <= len(rows) // 3, rows  # each cut frees about half the context
    for i, (prompt, prefill, cut, new) in enumerate(rows[1:], 1):
        if not cut:  # the cached prefix is reused: the reply and the new message, plus template tokens
            assert prefill <= new + 16, (i, rows)
            assert prefill < prompt / 2, (i, rows)
    print("\n(prompt, prefill, cut, new) per turn:", rows)
    assert_stored_whole(store, session, [f"Turn {i}. " + ESSAYS[i % 6][:250] for i in range(16)])


# ----------------------------------------------------------------------------------------------
# Roles alternate


def test_a_reply_stopped_before_its_first_token_leaves_roles_alternating(
        backends: dict[tuple[str, int], EmbeddedBackend], store: Store) -> None:
    session = session_on(backends, "drop-oldest", 256, store)
    cancel = threading.Event()
    cancel.set()
    done = session.send("First, stopped at once.", GREEDY, cancel, 8)
    assert done.finish_reason == "cancelled" and not done.text
    assert [m["role"] for m in session.messages] == ["user"]  # an empty stopped reply is not kept
    done, _ = say(session, "Second.")
    assert done.text
    assert [m["role"] for m in session.messages] == ["user", "user", "assistant"]
    prompt = session.prompt_messages()
    assert [m["role"] for m in prompt] == ["system", "user", "assistant"]
    assert prompt[1]["content"] == "Second."
    assert_stored_whole(store, session, ["First, stopped at once.", "Second."])


# ----------------------------------------------------------------------------------------------
# Marks of a cut reply: exports and `ask`


def test_exports_mark_a_reply_cut_by_the_context_end(backends: dict[tuple[str, int], EmbeddedBackend],
                                                     store: Store) -> None:
    session = session_on(backends, "drop-oldest", 256, store)
    say(session, "Go on and on.", TO_THE_END)
    say(session, "Thanks.")
    assert session.conversation_id is not None
    conversation = store.get(session.conversation_id)
    markdown = export_conversation(conversation, "md")
    assert markdown.count("## Assistant (cut)") == 1 and markdown.count("## Assistant\n") == 1
    assert markdown.count("*Cut: the reply reached the end of the context.*") == 1
    html = export_conversation(conversation, "html")
    assert html.count('<span class="badge">Cut: the reply reached the end of the context</span>') == 1
    data = json.loads(export_conversation(conversation, "json"))
    assert [m["finish_reason"] for m in data["messages"]] == [None, "context", None, "length"]


def test_ask_tells_on_stderr_when_the_prompt_was_cut(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[models.small]\ntarget = "{tiny}"\nn_ctx = 256\nn_threads = 1\nmax_tokens = 8\n')
    result = beechat("--config", str(config), "ask", "--json", "-", stdin=" ".join(["tell me more"] * 200))
    assert result.returncode == 0, result.stderr
    assert "beechat: note: context full: the newest message is longer than the context" in result.stderr
    data = json.loads(result.stdout)
    assert data["text"] and data["finish_reason"] == "length" and data["stats"]["ctx_used"] <= 256
