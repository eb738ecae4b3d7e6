"""SIGKILL during a streamed reply: only the reply in flight can lose text (real model, real app)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from beechat import locations
from beechat.store import Store

CONFIG = """\
[models.demo]
target = "{model}"
n_ctx = 4096
n_threads = 1
max_tokens = 2000
system_prompt = "You are a helpful assistant."
[models.demo.sampling]
temperature = 0.0
"""


def test_sigkill_mid_reply_loses_only_the_reply_in_flight(tmp_path: Path, demo_model: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(CONFIG.format(model=demo_model))
    child = subprocess.Popen(
        [sys.executable, "-m", "beechat", "--config", str(config), "--plain"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ.copy(),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or []], daemon=True).start()
    try:
        assert child.stdin is not None
        child.stdin.write("Say hello in five words.\n")
        child.stdin.flush()
        first_reply: list[str] = []
        deadline = time.monotonic() + 120
        while True:  # the first reply, up to its stats line
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("[decode"):
                break
            first_reply.append(line)
        # greedy SmolLM2 writes 400+ tokens for this (checked); the kill lands while it streams
        child.stdin.write("Write a long essay about the history of Rome.\n")
        child.stdin.flush()
        # wait until the streamed reply has been saved at least once, then kill without warning
        database = locations.database_file()
        partial = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(partial) < 40:
            time.sleep(0.3)
            with Store(database) as store:
                conversation = store.get(store.resolve("last"))
                last = conversation.messages[-1]
                if last.role == "assistant":
                    assert not last.complete, "the reply finished before the kill; the test needs a longer one"
                    partial = last.content
        assert len(partial) >= 40, "the streamed reply was never saved while streaming"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    with Store(locations.database_file()) as store:
        conversation = store.get(store.resolve("last"))
    roles = [(m.role, m.complete) for m in conversation.messages]
    assert roles == [("user", True), ("assistant", True), ("user", True), ("assistant", False)]
    first, answer, second, in_flight = conversation.messages
    assert first.content == "Say hello in five words."
    assert answer.content.strip() == "".join(first_reply).strip()  # the finished reply, whole
    assert answer.stats is not None and answer.stats["decode_tps"] > 0
    assert second.content.startswith("Write a long essay")
    assert len(in_flight.content) >= len(partial)  # at least what had been saved before the kill
