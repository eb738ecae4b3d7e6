"""Generated conversations against a real (tiny) model: no shape of chat dead-ends.

Hypothesis generates conversations - how many messages, how long each message and reply is (from
one word to several times the context; replies from one token to "until the context ends"),
replies stopped before their first token, n_ctx, the overflow policy and a switch to another
profile mid-chat - and plays them through ChatSession (a real SQLite store) on the embedded
backend. The model is a tiny generated GGUF (tests/gguf_factory.py) with SmolLM2's tokenizer and
chat template: random weights, so a reply runs as long as max_tokens allows. Backends are loaded
once per (n_ctx, policy) and reset between conversations.

Invariants, every turn: no exception; a reply, or (overflow = "stop" only) a one-line error that
names the fix; the prompt the model is given leaves the reply reserve free and its roles alternate
(system first, then user / assistant, ending with the user); a turn that did not cut again
evaluates only what is new (the KV prefix is reused); at the end the stored conversation holds
every message sent and every reply kept, in order.

BEECHAT_OVERFLOW_EXAMPLES sets the number of conversations (default 500: keep it >= 500 in CI).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beechat.backends.embedded import EmbeddedBackend
from beechat.config import EmbeddedSettings, Profile, Sampling
from beechat.engine.chat import ChatEngine
from beechat.events import ChatMessage, Done, Event, Notice
from beechat.session import ChatSession
from beechat.store import Store
from tests.gguf_factory import write_llama

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("BEECHAT_OVERFLOW_EXAMPLES", "500"))
N_CTXS = (256, 512)  # llama.cpp pads n_ctx to a multiple of 256
POLICIES = ("stop", "drop-oldest", "truncate-middle")
SYSTEM = "You are a terse assistant. Answer in a few words."
WORDS = ("river", "stone", "lamp", "quiet", "orange", "seven", "window", "garden", "north", "paper")
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
TO_THE_END = 100_000  # max_tokens for a reply that runs until the context ends
FIXES = ("new conversation", "n_ctx", "system_prompt")  # what a one-line error must point to


@dataclass
class Spy:
    """Records, without changing anything, the messages behind each prompt the model is given."""

    rendered: dict[tuple[int, ...], list[ChatMessage]] = field(default_factory=dict)
    prompts: list[list[ChatMessage]] = field(default_factory=list)

    def attach(self, engine: ChatEngine) -> None:
        tokenize, prefill = engine.tokenize_chat, engine.generator.prefill

        def tokenize_chat(messages: Sequence[ChatMessage]) -> list[int]:
            tokens = tokenize(messages)
            self.rendered[tuple(tokens)] = [dict(m) for m in messages]  # type: ignore[misc]
            return tokens

        def prefill_spy(prompt: Sequence[int], cancel: threading.Event | None = None, *args: Any) -> int:
            self.prompts.append(self.rendered[tuple(prompt)])
            self.rendered.clear()
            return prefill(prompt, cancel, *args)

        engine.tokenize_chat = tokenize_chat  # type: ignore[method-assign]
        engine.generator.prefill = prefill_spy  # type: ignore[method-assign]


@dataclass
class Loaded:
    backend: EmbeddedBackend
    profile: Profile
    spy: Spy

    @property
    def engine(self) -> ChatEngine:
        assert self.backend.engine is not None
        return self.backend.engine


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[int, str], Loaded]]:
    # the smallest useful model (0.3 ms a token on one CPU thread): replies cost little
    model = write_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_layer=1, n_embd=32, head_seed=21,
                        layer_seed=22)
    made: dict[tuple[int, str], Loaded] = {}
    try:
        for n_ctx, policy in itertools.product(N_CTXS, POLICIES):
            settings = EmbeddedSettings(target=str(model), n_ctx=n_ctx, n_threads=1, overflow=policy)  # type: ignore[arg-type]
            profile = Profile(name=f"tiny-{n_ctx}-{policy}", settings=settings, system_prompt=SYSTEM, sampling=GREEDY)
            backend = EmbeddedBackend(profile)
            backend.load()
            spy = Spy()
            made[n_ctx, policy] = Loaded(backend, profile, spy)
            spy.attach(made[n_ctx, policy].engine)
        yield made
    finally:
        for item in made.values():
            item.backend.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store(tmp_path_factory.mktemp("db") / "conversations.sqlite3") as opened:
        yield opened


@st.composite
def messages(draw: st.DrawFn) -> str:
    """A user message from one word to far more than the largest context."""
    n_words = draw(st.one_of(st.integers(1, 6), st.integers(7, 60), st.integers(61, 600)))
    start = draw(st.integers(0, len(WORDS) - 1))
    return " ".join(WORDS[(start + i * 3) % len(WORDS)] for i in range(n_words))


@dataclass(frozen=True)
class Turn:
    text: str
    max_tokens: int
    stopped_at_once: bool  # the user stops the reply before its first token


turns = st.builds(
    Turn, messages(),
    # short, medium, or until the context ends (one turn in eight: those replies cost the most)
    st.sampled_from((0, 0, 1, 1, 1, 1, 1, 2)).flatmap(
        lambda kind: (st.integers(1, 4), st.integers(5, 40), st.just(TO_THE_END))[kind]),
    st.integers(0, 9).map(lambda n: n == 0),  # one turn in ten
)


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    n_ctx = draw(st.sampled_from((*N_CTXS, N_CTXS[0])))  # the smaller context twice as often: cheaper
    policy = draw(st.sampled_from(POLICIES))
    plan = draw(st.lists(turns, min_size=1, max_size=8))
    switch = draw(st.none() | st.tuples(st.integers(0, len(plan)), st.sampled_from(N_CTXS),
                                         st.sampled_from(POLICIES)))
    return {"n_ctx": n_ctx, "policy": policy, "plan": plan, "switch": switch}


def one_reply(session: ChatSession, text: str, max_tokens: int, stop_at_once: bool) -> tuple[Done, list[str]]:
    notices: list[str] = []
    cancel = threading.Event()
    if stop_at_once:
        cancel.set()

    def on_event(event: Event) -> None:
        if isinstance(event, Notice):
            notices.append(event.message)

    return session.send(text, GREEDY, cancel, max_tokens, on_event), notices


def check_prompt(prompt: list[ChatMessage]) -> None:
    roles = [m["role"] for m in prompt]
    body = roles[1:] if roles and roles[0] == "system" else roles
    assert "system" not in body, roles
    assert body and body[0] == "user" and body[-1] == "user", roles
    assert all(a != b for a, b in itertools.pairwise(body)), roles


class Totals:
    conversations = 0
    turns = 0
    cuts = 0
    replies_to_the_end = 0
    errors = 0
    seconds = 0.0


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conversation=conversations())
def test_generated_conversations_never_dead_end(loaded: dict[tuple[int, str], Loaded], store: Store,
                                                 conversation: dict[str, Any]) -> None:
    started = time.perf_counter()
    current = loaded[conversation["n_ctx"], conversation["policy"]]
    current.backend.reset()
    try:
        session = ChatSession(current.backend, current.profile, store)
        sent: list[str] = []
        previous: Done | None = None
        switch = conversation["switch"]
        plan: list[Turn] = [*conversation["plan"], Turn("ok?", 8, False)]  # then one more short message
        for index, turn in enumerate(plan):
            if switch is not None and index == switch[0]:
                current = loaded[switch[1], switch[2]]
                current.backend.reset()  # a switch loads a fresh model
                session.switch_backend(current.backend, current.profile, current.backend.info())
                previous = None
            engine = current.engine
            before = len(current.spy.prompts)
            last_reply = session.messages[-1]["content"] if session.messages and previous is not None else None
            stop = turn.stopped_at_once and index < len(plan) - 1
            done, notices = one_reply(session, turn.text, turn.max_tokens, stop)
            sent.append(turn.text)
            Totals.turns += 1
            Totals.cuts += bool(notices and notices[0].startswith("context full"))
            if done.finish_reason == "cancelled":
                previous = None
                continue
            if done.error is not None:  # only "stop" may refuse, in one line that names the fix
                Totals.errors += 1
                assert current.profile.embedded.overflow == "stop", done.error
                assert done.finish_reason == "context" and "\n" not in done.error, done.error
                assert any(fix in done.error for fix in FIXES), done.error
                previous = None
                continue
            # a reply: the prompt left the reserve free and its roles alternate
            assert done.finish_reason in ("stop", "length", "context"), done
            assert len(current.spy.prompts) == before + 1
            check_prompt(current.spy.prompts[-1])
            reserve = engine.reply_reserve(turn.max_tokens)
            assert done.stats.prompt_tokens is not None and done.stats.prompt_tokens <= engine.context.n_ctx - reserve
            assert done.stats.ctx_used is not None and done.stats.ctx_used <= engine.context.n_ctx
            if done.finish_reason == "context":
                Totals.replies_to_the_end += 1
                assert any(n.startswith("reply cut") for n in notices), notices
            # no new cut: only the last reply and the new message are evaluated (the prefix is reused)
            if previous is not None and last_reply is not None and not any(n.startswith("context full")
                                                                           for n in notices):
                new = engine.count_tokens(last_reply) + engine.count_tokens(turn.text) + 16
                assert done.stats.prefill_tokens is not None and done.stats.prefill_tokens <= new, (
                    done.stats.prefill_tokens, new)
            previous = done
        # the stored conversation is whole: every message sent, every reply kept, in order
        assert session.conversation_id is not None
        stored = store.chat_messages(session.conversation_id)
        assert [m for m in stored if m["role"] != "system"] == session.messages
        assert [m["content"] for m in stored if m["role"] == "user"] == sent
        Totals.conversations += 1
    finally:
        Totals.seconds += time.perf_counter() - started


def test_report_totals() -> None:
    """Not a check: prints what the generated conversations covered (run with -s to see it)."""
    print(f"\n{Totals.conversations} conversations, {Totals.turns} turns, {Totals.cuts} cuts, "
          f"{Totals.replies_to_the_end} replies to the context end, {Totals.errors} refusals (stop), "
          f"{Totals.seconds:.1f} s")
