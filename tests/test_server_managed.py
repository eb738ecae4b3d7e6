"""Managed servers: beechat starts the profile's server command, waits for it, and always stops it."""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from beechat import locations
from beechat.backends.base import BackendError
from beechat.backends.openai import OpenAIBackend
from beechat.backends.server import (
    ManagedServer,
    command_flags,
    expand_command,
    help_flags,
    help_prefix,
    root_url,
    speculation_from_command,
)
from beechat.backends.server_kv import llama_server_args
from beechat.config import Profile, Sampling, ServerSpec, load_config_file
from beechat.doctor import FAIL, OK, WARN, check_server_command
from beechat.events import Done
from tests.support import demo_model_path, flat_profile, free_port

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
FAKE_SERVER = DATA / "fake_loading_server.py"
XLLAMACPP_SERVER = DATA / "xllamacpp_server.py"






def proc_state(pid: int) -> str | None:
    """The /proc state letter of a live process; None when it is gone (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def wait_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    return False


def managed_profile(command: list[str], port: int | None, **overrides: object) -> Profile:
    spec = ServerSpec(command=tuple(command), port=port, startup_timeout=float(overrides.pop("startup", 60.0)))  # type: ignore[arg-type]
    fields: dict[str, object] = {"name": "managed", "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                 "max_tokens": 16, "connect_timeout": 2.0, "timeout": 60.0, "server": spec}
    fields.update(overrides)
    return flat_profile(**fields)  # type: ignore[arg-type]


def test_llama_cpp_server_is_started_and_stopped() -> None:
    model = demo_model_path()
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
               "--n_ctx", "512"]
    backend = OpenAIBackend(managed_profile(command, port))
    progress: list[tuple[float, str]] = []
    info = backend.load(lambda fraction, what: progress.append((fraction, what)))
    assert backend.server is not None
    pid = backend.server.pid
    assert pid is not None and proc_state(pid) is not None
    assert os.getpgid(pid) == pid  # its own process group
    # llama_cpp.server has no /health: readiness came from /v1/models
    assert progress and progress[-1][0] == 1.0
    log = backend.server.log_path
    assert log.parent == locations.logs_dir() and log.name == "server-managed.log"
    # KV capacity from the server's own `llama_kv_cache: size = ... MiB` line
    assert info.kv_bytes_capacity is not None and info.kv_bytes_capacity > 0
    assert (info.cache_type_k, info.cache_type_v) == ("f16", "f16")
    events = list(backend.stream([{"role": "user", "content": "Say hi"}], Sampling(temperature=0.0),
                                 threading.Event(), 8))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason in ("stop", "length") and done.text
    assert done.stats.kv_bytes_capacity == info.kv_bytes_capacity
    backend.close()
    assert proc_state(pid) is None
    assert wait_gone(pid, 5.0)
    backend.close()  # twice is fine


def test_waits_through_loading_and_stops_the_whole_group() -> None:
    port = free_port()
    command = [sys.executable, str(FAKE_SERVER), str(port), "1.0", "--child"]
    backend = OpenAIBackend(managed_profile(command, port))
    progress: list[tuple[float, str]] = []
    info = backend.load(lambda fraction, what: progress.append((fraction, what)))
    assert any("loading the model" in what for _, what in progress)  # 503 "Loading model" meant: wait
    assert all(0.0 <= fraction <= 1.0 for fraction, _ in progress)
    assert info.n_ctx == 1024 and info.kv_bytes_capacity == 12 * 1024 * 1024
    assert (info.cache_type_k, info.cache_type_v) == ("q8_0", "q8_0")
    assert backend.server is not None and backend.server.pid is not None
    pgid = backend.server.pid
    assert len(group_members(pgid)) == 2  # the server and its child
    backend.close()
    assert wait_gone(pgid, 5.0)


def test_command_not_found() -> None:
    port = free_port()
    backend = OpenAIBackend(managed_profile(["beechat-no-such-server-binary", "--port", str(port)], port))
    with pytest.raises(BackendError, match=r"^command not found: beechat-no-such-server-binary$"):
        backend.load()
    assert backend.server is None or backend.server.process is None
    with pytest.raises(BackendError, match=re.escape("command not found: ./missing/llama-server")):
        OpenAIBackend(managed_profile(["./missing/llama-server"], port)).load()


def test_command_that_exits_at_once_shows_its_log_tail() -> None:
    port = free_port()
    script = "import sys; print('loading...'); print('error: unknown argument: --bogus', file=sys.stderr); sys.exit(3)"
    backend = OpenAIBackend(managed_profile([sys.executable, "-c", script], port))
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.load()
    message = str(caught.value)
    assert "exited with code 3" in message and "error: unknown argument: --bogus" in message
    assert "\n" not in message
    assert time.monotonic() - started < 10


def test_port_busy() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        backend = OpenAIBackend(managed_profile([sys.executable, str(FAKE_SERVER), str(port), "0"], port))
        with pytest.raises(BackendError, match=f"^port {port} is busy"):
            backend.load()
        assert backend.server is not None and backend.server.process is None  # nothing was started


def test_startup_timeout_stops_the_process() -> None:
    port = free_port()
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    backend = OpenAIBackend(managed_profile(command, port, startup=1.0))
    with pytest.raises(BackendError, match="did not become ready within 1 s"):
        backend.load()
    assert backend.server is not None and backend.server.pid is not None
    assert wait_gone(backend.server.pid, 5.0)


def test_unreferenced_server_is_stopped_by_the_garbage_collector() -> None:
    port = free_port()
    spec = ServerSpec(command=(sys.executable, "-c", "import time; time.sleep(60)"), port=port)
    server = ManagedServer(spec, "gc", f"http://127.0.0.1:{port}/v1")
    server.start()
    pid = server.pid
    assert pid is not None and proc_state(pid) is not None
    del server
    gc.collect()
    assert wait_gone(pid, 5.0)


def test_interpreter_exit_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    program = textwrap.dedent(f"""
        import sys
        from beechat.backends.server import ManagedServer
        from beechat.config import ServerSpec
        spec = ServerSpec(command=(sys.executable, {str(FAKE_SERVER)!r}, "{port}", "0", "--child"), port={port})
        server = ManagedServer(spec, "atexit", "http://127.0.0.1:{port}/v1")
        server.start()
        server.wait_ready(timeout=30)
        print(server.pid, flush=True)
        KEEP = server  # still referenced at exit: only atexit can stop it
    """)
    env = {**os.environ, "BEECHAT_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                            timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    pgid = int(result.stdout.split()[0])
    assert wait_gone(pgid, 5.0)


def test_command_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = expand_command([sys.executable, "-m", "~/models/a.gguf", "--model-draft=~/d.gguf", "x~y"])
    assert argv == [sys.executable, "-m", f"{tmp_path}/models/a.gguf", f"--model-draft={tmp_path}/d.gguf", "x~y"]
    assert root_url("http://h:1/v1") == "http://h:1" and root_url("http://h:1/api/") == "http://h:1/api"
    beellama = ["llama-server", "-m", "t.gguf", "--spec-type", "draft-dflash", "--spec-draft-model", "~/m/dflash.gguf"]
    assert speculation_from_command(beellama) == ("draft", "dflash.gguf")
    assert speculation_from_command(["llama-server", "-m", "t.gguf", "-md", "d.gguf"]) == ("draft", "d.gguf")
    assert speculation_from_command(["llama-server", "--spec-type", "ngram-simple"]) == ("ngram", None)
    vllm = ["vllm", "serve", "Qwen/Qwen3-8B", "--speculative-config",
            '{"method": "eagle3", "model": "org/eagle3-head", "num_speculative_tokens": 3}']
    assert speculation_from_command(vllm) == ("draft", "org/eagle3-head")
    assert speculation_from_command(["llama-server", "-m", "t.gguf"]) == ("none", None)


# -- beechat doctor: the server command's program and flags ----------------------------------------


def flag_lines(results: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["status"], r["detail"]) for r in results if "flag" in r["check"]]


def test_doctor_reports_each_unknown_flag_against_the_programs_help() -> None:
    # a real program answering --help: llama-cpp-python's server (pydantic-settings flags)
    command = (sys.executable, "-m", "llama_cpp.server", "--model", "m.gguf", "--n_ctx", "512", "--port=8001",
               "--ctx-size", "512", "-ngl", "-1", "--metrics")
    results = check_server_command("py", ServerSpec(command=command))
    assert results[0]["status"] == OK and results[0]["detail"] == f"{sys.executable} -> {sys.executable}"
    shown = f"{sys.executable} -m llama_cpp.server --help"
    assert flag_lines(results) == [
        (FAIL, f"unknown flag --ctx-size (not in `{shown}`)"),
        (FAIL, f"unknown flag -ngl (not in `{shown}`)"),
        (FAIL, f"unknown flag --metrics (not in `{shown}`)"),
    ]
    good = check_server_command("py", ServerSpec(command=command[:8]))
    assert flag_lines(good) == [(OK, f"all 3 flags are listed by `{shown}`")]


def test_doctor_checks_the_llama_server_style_test_peer() -> None:
    command = (sys.executable, str(XLLAMACPP_SERVER), "-m", "m.gguf", "--spec-type", "draft-simple", "-ctk", "q8_0",
               "--port", "8080", "--spec-dm-controller", "profit")
    assert flag_lines(check_server_command("xl", ServerSpec(command=command))) == [
        (FAIL, f"unknown flag --spec-dm-controller (not in `{sys.executable} {XLLAMACPP_SERVER} --help`)")]


def test_doctor_without_the_program_or_its_help(tmp_path: Path) -> None:
    missing = check_server_command("gone", ServerSpec(command=("beechat-no-such-server", "--port", "1")))
    assert [(r["status"], r["detail"]) for r in missing] == [(FAIL, "command not found: beechat-no-such-server")]
    inline = check_server_command("c", ServerSpec(command=(sys.executable, "-c", "pass", "--x")))
    assert flag_lines(inline) == [(WARN, "not checked: cannot tell which program reads them")]
    mute = tmp_path / "mute_server.py"
    mute.write_text("import sys; sys.exit(3)\n")
    failing = check_server_command("f", ServerSpec(command=(sys.executable, str(mute), "--port", "1")))
    assert flag_lines(failing) == [(WARN, f"not checked: `{sys.executable} {mute} --help` exited with code 3")]


def test_the_beellama_example_profile_uses_flags_beellama_documents() -> None:
    # tests/data/beellama_server_help_excerpt.txt is hand-written from BeeLlama v0.4.4's docs (no
    # binary runs here); every flag of models.toml's bee-dflash command must be in it
    profile = load_config_file(Path(__file__).parent.parent / "models.toml").profile("bee-dflash")
    assert profile.openai.server is not None
    command = list(profile.openai.server.command)
    known = help_flags((DATA / "beellama_server_help_excerpt.txt").read_text())
    assert help_prefix(command) == ["llama-server"]
    assert [flag for flag in command_flags(command[1:]) if flag not in known] == []
    assert command[command.index("--spec-type") + 1] == "draft-dflash"  # v0.4 rejects the old `dflash`
    args = llama_server_args(command)
    assert (args.type_k, args.type_v, args.n_ctx, args.spec_type) == ("kvarn5", "kvarn4", 131072, "draft-dflash")
    assert speculation_from_command(command) == ("draft", "Qwen3.6-27B-DFlash.gguf")


def test_help_and_flag_helpers() -> None:
    assert help_prefix(["vllm", "serve", "Qwen/Qwen3-8B", "--port", "8000"]) == ["vllm", "serve", "Qwen/Qwen3-8B"]
    assert help_prefix(["python3.11", "-m", "llama_cpp.server", "--model", "x"]) == ["python3.11", "-m",
                                                                                     "llama_cpp.server"]
    assert help_prefix(["python", "-c", "code"]) is None
    assert command_flags(["-ngl", "-1", "--temp", "-0.5", "--a=b", "--a", "--", "x", "-"]) == ["-ngl", "--temp", "--a"]
    text = "-ctk,  --cache-type-k TYPE   KV cache type (env: LLAMA_ARG_CACHE_TYPE_K)\n  --no-mmap. e.g. -ngl 99"
    assert help_flags(text) == {"-ctk", "--cache-type-k", "--no-mmap", "-ngl"}
