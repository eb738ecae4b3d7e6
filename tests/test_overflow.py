"""Conversations three times longer than the context, under each overflow policy."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from beechat.config import EmbeddedSettings, Sampling
from beechat.engine.chat import ChatEngine
from beechat.events import ChatMessage, Done, Notice

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
N_CTX = 512
FILLER = ("Tell me something about the number {i}. Here is some context you may ignore: "
          + "the river flows past the mill and the wheel turns slowly in the evening light. " * 6)


def run_conversation(engine: ChatEngine, turns: int) -> tuple[list[Done], list[str], list[ChatMessage]]:
    messages: list[ChatMessage] = [{"role": "system", "content": "Answer in one short sentence."}]
    dones: list[Done] = []
    notices: list[str] = []
    for i in range(turns):
        messages.append({"role": "user", "content": FILLER.format(i=i)})
        done = None
        for event in engine.generate(messages, GREEDY, threading.Event(), 24):
            if isinstance(event, Notice):
                notices.append(event.message)
            elif isinstance(event, Done):
                done = event
        assert done is not None
        dones.append(done)
        if done.finish_reason in ("error", "context") and not done.text:
            break
        messages.append({"role": "assistant", "content": done.text})
    return dones, notices, messages


@pytest.fixture(scope="module")
def engines(demo_model: Path) -> dict[str, ChatEngine]:
    made = {policy: ChatEngine(EmbeddedSettings(target=str(demo_model), n_ctx=N_CTX, overflow=policy,  # type: ignore[arg-type]
                                                n_threads=1))
            for policy in ("drop-oldest", "truncate-middle", "stop")}
    yield made  # type: ignore[misc]
    for e in made.values():
        e.close()


@pytest.mark.parametrize("policy", ["drop-oldest", "truncate-middle"])
def test_long_conversation_runs_to_the_end_with_notices(engines: dict[str, ChatEngine], policy: str) -> None:
    engine = engines[policy]
    engine.reset()
    dones, notices, messages = run_conversation(engine, turns=14)
    total = sum(engine.count_tokens(m["content"]) for m in messages)
    assert total > 3 * N_CTX  # the conversation really is three times the context
    assert all(d.finish_reason in ("stop", "length") and d.text for d in dones), [d.error for d in dones]
    assert notices and all("left out" in n and "stay in the conversation" in n for n in notices)
    # every prompt fitted, and the cache never overflowed
    assert all(d.stats.ctx_used is not None and d.stats.ctx_used <= N_CTX for d in dones)
    # after a cut, later turns reuse the cached prefix instead of re-evaluating everything
    reused = [d for d in dones[1:] if d.stats.prefill_tokens is not None and d.stats.prompt_tokens is not None
              and d.stats.prefill_tokens < d.stats.prompt_tokens / 2]
    assert len(reused) >= len(dones) // 2
    if policy == "drop-oldest":  # cuts are rare: each one frees about half the context
        assert len(notices) <= len(dones) // 2
    # (truncate-middle keeps the first exchange, so with messages this long relative to the
    # context it cuts nearly every turn; the kept head is still reused from the cache, above)


def test_truncate_middle_keeps_the_first_exchange(engines: dict[str, ChatEngine]) -> None:
    engine = engines["truncate-middle"]
    engine.reset()
    messages: list[ChatMessage] = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        messages.append({"role": "user", "content": FILLER.format(i=i)})
        messages.append({"role": "assistant", "content": f"Reply number {i}."})
    messages.append({"role": "user", "content": "And finally?"})
    tokens, notice = engine.fit(messages, reserve=64)
    rendered = b"".join(engine.model.piece(t) for t in tokens).decode("utf-8", "replace")
    assert notice is not None and len(tokens) <= N_CTX - 64
    assert "number 0." in rendered and "Reply number 0." in rendered  # first exchange kept
    assert "And finally?" in rendered  # newest kept
    assert "Reply number 5." not in rendered  # the middle is gone
    roles = [part.split("\n", 1)[0] for part in rendered.split("<|im_start|>")[2:]]
    assert all(a != b for a, b in itertools.pairwise(roles)), roles  # still alternating


def test_stop_policy_ends_with_a_clear_message(engines: dict[str, ChatEngine]) -> None:
    engine = engines["stop"]
    engine.reset()
    dones, _, _ = run_conversation(engine, turns=14)
    last = dones[-1]
    assert last.finish_reason == "context" and not last.text
    assert last.error is not None and "overflow = \"stop\"" in last.error and "n_ctx" in last.error
    assert all(d.text for d in dones[:-1])


def test_a_single_huge_message_is_cut_to_its_end(engines: dict[str, ChatEngine]) -> None:
    engine = engines["drop-oldest"]
    engine.reset()
    huge = " ".join(f"word{i}" for i in range(3000)) + " THE END"
    tokens, notice = engine.fit([{"role": "user", "content": huge}], reserve=64)
    rendered = b"".join(engine.model.piece(t) for t in tokens).decode("utf-8", "replace")
    assert len(tokens) <= N_CTX - 64 and "THE END" in rendered and "word0 " not in rendered
    assert notice is not None
