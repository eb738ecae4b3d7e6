"""Edge cases found in review: stale recurrent checkpoints, role alternation after a cut, verify
batches larger than n_batch, the decode-rate definition with a multi-token first pass."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from beechat.config import EmbeddedSettings, Sampling
from beechat.engine.chat import ChatEngine
from beechat.engine.chat_template import ChatTemplate
from beechat.engine.llama import Context, Model
from beechat.events import ChatMessage, DecodeClock, Done, collect

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)

# Like Gemma's / Mistral's templates: roles must alternate user/assistant after the system prompt.
STRICT = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_checkpoint_from_other_tokens_is_never_restored(tiny_models: dict[str, Path]) -> None:
    model = Model(tiny_models["hybrid"])
    ctx = Context(model, n_ctx=256, n_threads=1)
    a = model.tokenize("alpha beta gamma delta epsilon zeta")
    ctx.decode(a)
    checkpoint = ctx.save_partial_state()
    ctx.clear()
    b = model.tokenize("one two three four five six seven eight nine ten eleven twelve")
    ctx.decode(b)
    ctx.rewind(len(a) + 2, checkpoint)  # A's state under B's cache would be silently wrong
    assert ctx.n_past == 0
    assert not checkpoint.valid  # the clear invalidated it for good
    # a checkpoint over the tokens still in the cache is restored, and computes what a fresh context does
    extra = model.tokenize(" and more words follow here")
    ctx.clear()
    ctx.decode(a)
    checkpoint = ctx.save_partial_state()
    ctx.decode(extra)
    ctx.rewind(len(a) + 1, checkpoint)
    assert ctx.tokens == a
    got = ctx.decode(extra[:1])[0].copy()
    fresh = Context(model, n_ctx=256, n_threads=1)
    want = fresh.decode(a + extra[:1])[0].copy()
    assert np.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("policy", ["drop-oldest", "truncate-middle"])
def test_cuts_keep_roles_alternating(demo_model: Path, policy: str) -> None:
    engine = ChatEngine(EmbeddedSettings(target=str(demo_model), n_ctx=512, overflow=policy, n_threads=1))  # type: ignore[arg-type]
    engine.template = ChatTemplate(STRICT)
    try:
        messages: list[ChatMessage] = [{"role": "system", "content": "Be brief."}]
        for i in range(14):
            messages.append({"role": "user", "content": f"Question {i}: " + "tell me about rivers. " * 12})
            done = collect(engine.generate(messages, GREEDY, threading.Event(), 16))
            assert done.finish_reason in ("stop", "length"), done.error
            messages.append({"role": "assistant", "content": done.text or "ok"})
    finally:
        engine.close()


def test_drafts_never_exceed_one_verify_batch(demo_model: Path) -> None:
    engine = ChatEngine(EmbeddedSettings(target=str(demo_model), speculation="ngram", draft_max=16, n_batch=8,
                                         n_ctx=1024, n_threads=1))
    try:
        text = "a b c d e f g h i j k l m n o p " * 6
        done = collect(engine.generate([{"role": "user", "content": f"Repeat: {text}"}], GREEDY,
                                       threading.Event(), 48, fixed_k=16))
        assert isinstance(done, Done) and done.finish_reason in ("stop", "length"), done.error
    finally:
        engine.close()


def test_decode_rate_leaves_out_tokens_emitted_with_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import beechat.events as events

    now = [10.0]
    monkeypatch.setattr(events.time, "perf_counter", lambda: now[0])
    clock = DecodeClock(started=10.0)
    for t, n in ((11.0, 5), (12.0, 5), (13.0, 5), (14.0, 1)):
        now[0] = t
        clock.tokens_emitted(n)
    # 11 tokens were produced in the 3 seconds after the first emission
    assert clock.decode_tps == pytest.approx(11 / 3)
    assert clock.ttft_s == pytest.approx(1.0)
