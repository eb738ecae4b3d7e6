"""Recurrent-state snapshots only while drafting pays (engine/snapshots.py): a speculative profile
on a hybrid target whose draft does not pay decodes without snapshots from the next reply on, and
gets them back once probes show drafting pays. Output stays plain greedy decoding throughout."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from beechat.engine.chat import ChatEngine
from beechat.engine.llama import Context, LlamaError
from beechat.engine.snapshots import SnapshotSwitch
from beechat.events import ChatMessage, Done, Notice
from tests.gguf_factory import write_qwen35
from tests.test_engine import GREEDY, engine

TURNS = ["Write a haiku about the sea.", "Now explain what a haiku is.", "List three colours.",
         "And three animals."]


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


def test_snapshots_go_while_drafting_does_not_pay_and_come_back(tiny_models: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SnapshotSwitch, "OFF_PASSES", 8)
    useless = write_qwen35(tmp_path / "useless.gguf", n_layer=4, head_seed=99, layer_seed=8)
    plain = engine(tiny_models["hybrid"], n_ctx=1024)
    spec = engine(tiny_models["hybrid"], draft=useless, speculation="draft", n_ctx=1024, draft_max=4)
    try:
        want: list[ChatMessage] = []
        got: list[ChatMessage] = []
        assert spec.context.n_rs_seq == 4
        _, first_notices = say(spec, got, TURNS[0])
        say(plain, want, TURNS[0])
        controller = spec.generator.controller
        assert not controller.learning and controller.drafting == 0 and controller.off_passes >= 8
        assert not any("snapshots" in n for n in first_notices)
        # the next reply decodes without snapshots, after a notice, and its text is still plain's
        done, notices = say(spec, got, TURNS[1])
        say(plain, want, TURNS[1])
        assert spec.context.n_rs_seq == 0 and spec.generator.context is spec.context
        assert any("without its 4 rollback snapshots" in n for n in notices)
        assert done.stats.prefill_tokens == done.stats.prompt_tokens  # the conversation was read again
        assert done.stats.drafted == 0
        assert got == want
        # drafting that pays again (as probes would show it): the snapshots come back
        controller._last_choice, controller._stale = 2, False
        done, notices = say(spec, got, TURNS[2])
        say(plain, want, TURNS[2])
        assert spec.context.n_rs_seq == 4 and spec.generator.verify_drafts
        assert any("snapshots are back" in n for n in notices)
        assert got == want
        assert spec.kv.capacity() == done.stats.kv_bytes_capacity
    finally:
        spec.close()
        plain.close()


@pytest.mark.parametrize("draft", ["self", "useless"])
def test_drafts_on_every_pass_keep_the_snapshots(tiny_models: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, draft: str) -> None:
    """draft_min drafts on every pass, paying or not: those need the rollback."""
    monkeypatch.setattr(SnapshotSwitch, "OFF_PASSES", 8)
    path = tiny_models["hybrid"] if draft == "self" else write_qwen35(tmp_path / "useless.gguf", head_seed=99)
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


def test_a_fixed_draft_length_gets_the_snapshots_back(tiny_models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`beechat bench` drafts a fixed length on every pass: a reply asking for that restores the
    snapshots even while the controller would keep them off."""
    monkeypatch.setattr(SnapshotSwitch, "OFF_PASSES", 8)
    useless = write_qwen35(tmp_path / "useless.gguf", n_layer=4, head_seed=99, layer_seed=8)
    spec = engine(tiny_models["hybrid"], draft=useless, speculation="draft", n_ctx=1024, draft_max=4)
    try:
        messages: list[ChatMessage] = []
        say(spec, messages, TURNS[0])
        say(spec, messages, TURNS[1])
        assert spec.context.n_rs_seq == 0
        messages.append({"role": "user", "content": TURNS[2]})
        events = list(spec.generate(messages, GREEDY, threading.Event(), 8, fixed_k=2))
        assert spec.context.n_rs_seq == 4 and any(isinstance(e, Notice) for e in events)
        done = events[-1]
        assert isinstance(done, Done) and done.finish_reason in ("stop", "length") and done.stats.drafted
        assert spec._snapshots.wanted(spec.generator) == 0  # an adaptive reply would drop them again
    finally:
        spec.close()


def test_snapshots_that_cannot_come_back_leave_a_working_engine(tiny_models: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the context with snapshots cannot be had again (memory taken meanwhile), the engine
    keeps decoding without them, says why, and the reply is still plain's."""
    monkeypatch.setattr(SnapshotSwitch, "OFF_PASSES", 8)
    useless = write_qwen35(tmp_path / "useless.gguf", n_layer=4, head_seed=99, layer_seed=8)
    plain = engine(tiny_models["hybrid"], n_ctx=1024)
    spec = engine(tiny_models["hybrid"], draft=useless, speculation="draft", n_ctx=1024, draft_max=4)
    try:
        want: list[ChatMessage] = []
        got: list[ChatMessage] = []
        for text in TURNS[:2]:
            say(spec, got, text)
            say(plain, want, text)
        assert spec.context.n_rs_seq == 0
        make = spec._new_context

        def no_snapshots_now(n_rs_seq: int) -> Context:
            if n_rs_seq:
                raise LlamaError("failed to create the context: out of memory (simulated)")
            return make(n_rs_seq)

        monkeypatch.setattr(spec, "_new_context", no_snapshots_now)
        spec.generator.controller._last_choice = 2  # probes would have it draft again
        _, notices = say(spec, got, TURNS[2])
        say(plain, want, TURNS[2])
        assert any("could not be recreated with 4 rollback snapshots" in n and "out of memory" in n for n in notices)
        assert spec.context.n_rs_seq == 0 and not spec.generator.verify_drafts
        assert got == want
        before = spec.context
        _, notices = say(spec, got, TURNS[3])  # no new attempt each reply (each would read the chat again)
        say(plain, want, TURNS[3])
        assert spec.context is before and not any("snapshots" in n for n in notices)
        assert got == want
    finally:
        spec.close()
        plain.close()
