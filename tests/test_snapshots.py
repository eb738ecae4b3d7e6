"""Recurrent-state snapshots only while drafting pays (engine/snapshots.py): a speculative profile
on a hybrid target whose draft does not pay decodes without snapshots from the next reply on, and
gets them back once probes show drafting pays. Output stays plain greedy decoding throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from beechat.engine import snapshots
from beechat.engine.chat import ChatEngine
from beechat.engine.llama import Context, LlamaError
from beechat.engine.snapshots import SnapshotSwitch
from beechat.events import ChatMessage, Done, Notice
from tests.gguf_factory import write_qwen35
from tests.test_engine import GREEDY, engine

TURNS = ["Write a haiku about the sea.", "Now explain what a haiku is.", "List three colours.",
         "And three animals."]


@pytest.fixture()
def useless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hybrid draft with another head: it agrees with the target only by chance."""
    monkeypatch.setattr(SnapshotSwitch, "OFF_PASS_BUDGET", 32)  # 8 passes at draft_max 4, not hundreds
    return write_qwen35(tmp_path / "useless.gguf", n_layer=4, head_seed=99, layer_seed=8)


@pytest.fixture()
def pair(tiny_models: dict[str, Path], useless: Path) -> Iterator[tuple[ChatEngine, ChatEngine]]:
    """(plain, speculative with the useless draft) on the tiny hybrid target."""
    plain = engine(tiny_models["hybrid"], n_ctx=1024)
    spec = engine(tiny_models["hybrid"], draft=useless, speculation="draft", n_ctx=1024, draft_max=4)
    try:
        yield plain, spec
    finally:
        spec.close()
        plain.close()


class Chats:
    """The same turns said to the plain and the speculative engine; the texts must stay equal."""

    def __init__(self, plain: ChatEngine, spec: ChatEngine) -> None:
        self.plain, self.spec = plain, spec
        self.want: list[ChatMessage] = []
        self.got: list[ChatMessage] = []
        self.plain_done: Done | None = None

    def say(self, text: str) -> tuple[Done, list[str]]:
        self.plain_done, _ = say(self.plain, self.want, text)
        done, notices = say(self.spec, self.got, text)
        assert self.got == self.want
        return done, notices


def say(e: ChatEngine, messages: list[ChatMessage], text: str, max_tokens: int = 40) -> tuple[Done, list[str]]:
    messages.append({"role": "user", "content": text})
    done, notices = None, []
    for event in e.generate(messages, GREEDY, threading.Event(), max_tokens):
        if isinstance(event, Notice):
            notices.append(event.message)
        elif isinstance(event, Done):
            done = event
    assert done is not None and done.finish_reason in ("stop", "length"), done
    messages.append({"role": "assistant", "content": done.text})
    return done, notices


def test_snapshots_go_while_drafting_does_not_pay_and_come_back(pair: tuple[ChatEngine, ChatEngine]) -> None:
    chats, spec = Chats(*pair), pair[1]
    assert spec.context.n_rs_seq == 4
    _, notices = chats.say(TURNS[0])
    controller = spec.generator.controller
    assert not controller.learning and controller.drafting == 0 and controller.off_passes >= 8
    assert not any("snapshots" in n for n in notices)
    # the next reply decodes without snapshots, after a notice, and its text is still plain's
    done, notices = chats.say(TURNS[1])
    assert spec.context.n_rs_seq == 0 and spec.generator.context is spec.context
    assert any("without its 4 rollback snapshots" in n and "cache carried over" in n for n in notices)
    # the cache came along: only the new turn was evaluated, as in the plain engine
    assert chats.plain_done is not None
    assert done.stats.prefill_tokens == chats.plain_done.stats.prefill_tokens < done.stats.prompt_tokens
    assert done.stats.drafted == 0
    # drafting that pays again (as probes would show it): the snapshots come back
    controller._last_choice, controller._stale = 2, False
    done, notices = chats.say(TURNS[2])
    assert spec.context.n_rs_seq == 4 and spec.generator.verify_drafts
    assert any("snapshots are back" in n and "cache carried over" in n for n in notices)
    assert done.stats.prefill_tokens == chats.plain_done.stats.prefill_tokens
    assert spec.kv.capacity() == done.stats.kv_bytes_capacity


@pytest.mark.parametrize("why", ["the copy fails", "little host memory"])
def test_a_cache_that_cannot_be_carried_is_read_again(pair: tuple[ChatEngine, ChatEngine],
                                                      monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Where the host copy of the cache cannot be had (it fails, or it would take more than half the
    available RAM), the switch still happens and the next prefill reads the whole conversation
    again; the text is plain's."""
    chats, spec = Chats(*pair), pair[1]
    chats.say(TURNS[0])
    if why == "the copy fails":
        def no_memory(self: Context) -> None:
            raise MemoryError

        monkeypatch.setattr(Context, "export_state", no_memory)
    else:
        size = spec.context.state_size()
        assert size > 0
        monkeypatch.setattr(snapshots, "available_memory", lambda use_gpu: (2 * size - 1, "system RAM"))
    done, notices = chats.say(TURNS[1])
    assert spec.context.n_rs_seq == 0
    assert any("without its 4 rollback snapshots" in n and "read again once" in n for n in notices)
    assert done.stats.prefill_tokens == done.stats.prompt_tokens


def test_an_imported_cache_decodes_as_the_original(tiny_models: dict[str, Path]) -> None:
    """Context.export_state / import_state between contexts with different snapshot counts: the
    next tokens are the ones the original context would decode, and a foreign state is refused."""
    e = engine(tiny_models["hybrid"], n_ctx=512)
    try:
        model = e.model
        prompt = model.tokenize("The history of the Roman Empire", add_special=True)
        src = Context(model, n_ctx=512, n_rs_seq=4)
        src.decode(prompt[:-1])
        tokens, data = src.export_state()
        dst = Context(model, n_ctx=512, n_rs_seq=0)
        assert dst.import_state(tokens, data) and dst.tokens == prompt[:-1]

        def greedy(ctx: Context, n: int) -> list[int]:
            out = [int(ctx.decode([prompt[-1]])[0].argmax())]
            for _ in range(n - 1):
                out.append(int(ctx.decode([out[-1]])[0].argmax()))
            return out

        assert greedy(dst, 12) == greedy(src, 12)
        assert not dst.import_state(tokens[:-1], data) and dst.n_past == 0  # tokens that do not match the state
        src.close()
        dst.close()
    finally:
        e.close()


@pytest.mark.parametrize("draft", ["self", "useless"])
def test_drafts_on_every_pass_keep_the_snapshots(tiny_models: dict[str, Path], useless: Path, draft: str) -> None:
    """draft_min drafts on every pass, paying or not: those need the rollback."""
    path = tiny_models["hybrid"] if draft == "self" else useless
    spec = engine(tiny_models["hybrid"], draft=path, speculation="draft", n_ctx=1024, draft_max=4, draft_min=2)
    try:
        messages: list[ChatMessage] = []
        for text in TURNS[:3]:
            done, notices = say(spec, messages, text)
            assert not any("snapshots" in n for n in notices)
            assert done.stats.drafted
        assert spec.context.n_rs_seq == 4
    finally:
        spec.close()


def test_a_fixed_draft_length_gets_the_snapshots_back(pair: tuple[ChatEngine, ChatEngine]) -> None:
    """`beechat bench` drafts a fixed length on every pass: a reply asking for that restores the
    snapshots even while the controller would keep them off."""
    chats, spec = Chats(*pair), pair[1]
    chats.say(TURNS[0])
    chats.say(TURNS[1])
    assert spec.context.n_rs_seq == 0
    messages = [*chats.got, {"role": "user", "content": TURNS[2]}]
    events = list(spec.generate(messages, GREEDY, threading.Event(), 8, fixed_k=2))
    assert spec.context.n_rs_seq == 4 and any(isinstance(e, Notice) for e in events)
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason in ("stop", "length") and done.stats.drafted
    assert spec._snapshots.wanted(spec.generator) == 0  # an adaptive reply would drop them again


def test_snapshots_that_cannot_come_back_leave_a_working_engine(pair: tuple[ChatEngine, ChatEngine],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the context with snapshots cannot be had again (memory taken meanwhile), the engine
    keeps decoding without them, says why, stops trying, and the replies are still plain's."""
    chats, spec = Chats(*pair), pair[1]
    chats.say(TURNS[0])
    chats.say(TURNS[1])
    assert spec.context.n_rs_seq == 0
    make = spec._new_context

    def no_snapshots_now(n_rs_seq: int) -> Context:
        if n_rs_seq:
            raise LlamaError("failed to create the context: out of memory (simulated)")
        return make(n_rs_seq)

    monkeypatch.setattr(spec, "_new_context", no_snapshots_now)
    spec.generator.controller._last_choice = 2  # probes would have it draft again
    _, notices = chats.say(TURNS[2])
    assert any("could not be recreated with 4 rollback snapshots" in n and "out of memory" in n for n in notices)
    assert spec.context.n_rs_seq == 0 and not spec.generator.verify_drafts
    before = spec.context
    _, notices = chats.say(TURNS[3])  # no new attempt each reply (each would read the chat again)
    assert spec.context is before and not any("snapshots" in n for n in notices)
