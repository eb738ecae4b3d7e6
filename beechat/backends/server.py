"""A server process beechat starts for an openai profile (`[models.NAME.server]`) and always stops.

The process runs in its own process group with its output in a log file under `logs_dir()`.
It is stopped (SIGTERM to the group, SIGKILL after a grace period) on `stop()`, when the owner
is garbage-collected and at interpreter exit, so no server outlives beechat's normal exit.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx

from beechat import locations
from beechat.backends.base import BackendError, ProgressCallback
from beechat.backends.metrics import ServerLogInfo, parse_server_log
from beechat.config import ServerSpec

STOP_GRACE_S = 5.0
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 6

_LIVE: weakref.WeakSet[ManagedServer] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def stop_all_servers() -> None:
    """Stop every managed server still running (registered with atexit)."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


atexit.register(stop_all_servers)


def root_url(base_url: str) -> str:
    """The server root: base_url without a trailing `/v1` (where /health, /props, /metrics live)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def is_loopback(url: str) -> bool:
    """Whether a URL points at this machine (then proxy environment variables must not apply)."""
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def expand_command(command: Sequence[str], cwd: Path | None = None) -> list[str]:
    """argv with `~` expanded in path-like arguments (`~/x` and `--opt=~/x`) and the program resolved."""
    argv: list[str] = []
    for arg in command:
        if arg.startswith("~"):
            arg = os.path.expanduser(arg)
        elif arg.startswith("-") and "=~" in arg:
            option, _, value = arg.partition("=")
            arg = f"{option}={os.path.expanduser(value)}"
        argv.append(arg)
    program = argv[0]
    if os.sep in program:
        path = Path(program)
        if not path.is_absolute() and cwd is not None:
            path = cwd / path
        if not path.is_file():
            raise BackendError(f"command not found: {command[0]}")
        argv[0] = str(path)
    else:
        found = shutil.which(program)
        if found is None:
            raise BackendError(f"command not found: {program}")
        argv[0] = found
    return argv


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a connect succeeds or a bind is refused)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _kill_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, wait up to `grace`, then SIGKILL whatever is left of it."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # stragglers of the group, or a leader that ignored SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)


def _finalize(process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    _kill_group(process, STOP_GRACE_S)
    with contextlib.suppress(OSError):
        log.close()


class ManagedServer:
    """One server process: start, wait until it answers, read its log, stop."""

    def __init__(self, spec: ServerSpec, name: str, base_url: str, connect_timeout: float = 10.0,
                 auth: httpx.Auth | None = None) -> None:
        self.spec = spec
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.root_url = root_url(self.base_url)
        self.connect_timeout = connect_timeout
        self.auth = auth
        self.log_path = locations.logs_dir() / f"server-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], IO[bytes]], ManagedServer] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def port(self) -> int | None:
        """server.port, else the port written in base_url."""
        if self.spec.port is not None:
            return self.spec.port
        return urlsplit(self.base_url).port

    def start(self) -> None:
        """Start the process; BackendError when the port is taken or the command cannot run."""
        if self.running():
            return
        host = urlsplit(self.base_url).hostname or "127.0.0.1"
        port = self.port()
        if port is not None and port_in_use(host, port):
            raise BackendError(f"port {port} is busy (another server is listening there; stop it or "
                               f"change the profile's server.port)")
        argv = expand_command(self.spec.command, self.spec.cwd)
        env = {**os.environ, **dict(self.spec.env)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=str(self.spec.cwd) if self.spec.cwd else None, start_new_session=True,
            )
        except FileNotFoundError as exc:
            log.close()
            raise BackendError(f"command not found: {self.spec.command[0]}") from exc
        except OSError as exc:
            log.close()
            raise BackendError(f"cannot start {self.spec.command[0]}: {exc.strerror or exc}") from exc
        self._finalizer = weakref.finalize(self, _finalize, self.process, log)
        with _LIVE_LOCK:
            _LIVE.add(self)

    def stop(self) -> None:
        """Stop the process and its group. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    # -- readiness ---------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None, progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> None:
        """Poll /health (503 means still loading; no /health: GET {base_url}/models) until it answers 200."""
        timeout = self.spec.startup_timeout if timeout is None else timeout
        started = time.monotonic()
        health_paths = [self.root_url + "/health", self.base_url + "/models"]
        http_timeout = httpx.Timeout(min(self.connect_timeout, 5.0), read=5.0)
        with httpx.Client(timeout=http_timeout, auth=self.auth, trust_env=not is_loopback(self.base_url)) as client:
            while True:
                self._check_alive()
                elapsed = time.monotonic() - started
                state = "starting server"
                status = self._probe(client, health_paths)
                if status == 200:
                    self._check_alive()
                    if progress is not None:
                        progress(0.95, "server ready")
                    return
                if status == 503:
                    state = "server is loading the model"
                if elapsed > timeout:
                    raise BackendError(f"server did not become ready within {timeout:g} s "
                                       f"(last: {state}); log: {self.log_path}")
                if progress is not None:
                    # no real progress signal exists: an honest curve that never reaches 1
                    progress(min(0.95, 1.0 - math.exp(-elapsed / 20.0)), f"{state} ({elapsed:.0f} s)")
                if (cancel or threading.Event()).wait(POLL_INTERVAL_S):
                    raise BackendError("server start cancelled")

    def _probe(self, client: httpx.Client, paths: list[str]) -> int | None:
        """Status of the first health path that exists (404 drops a path for good); None: no answer."""
        while paths:
            try:
                response = client.get(paths[0])
            except httpx.HTTPError:
                return None
            if response.status_code == 404 and len(paths) > 1:
                paths.pop(0)
                continue
            return response.status_code
        return None

    def _check_alive(self) -> None:
        code = self.exit_code()
        if self.process is None:
            raise BackendError("server was not started")
        if code is not None:
            raise BackendError(f"server exited during startup ({describe_exit(code)}): {self.log_tail()}"
                               f" (log: {self.log_path})")

    # -- log -----------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last non-empty lines of the log, joined into one line."""
        tail = [line.strip() for line in self.log_text().splitlines() if line.strip()][-lines:]
        text = " | ".join(tail) or "(no output)"
        return text if len(text) <= 600 else "..." + text[-597:]

    def log_info(self) -> ServerLogInfo:
        return parse_server_log(self.log_text())

    def describe_exit(self) -> str | None:
        """'exited with code N' plus the log tail when the process has ended, else None."""
        code = self.exit_code()
        if code is None:
            return None
        return f"the managed server {describe_exit(code)}; log: {self.log_path}"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def speculation_from_command(command: Sequence[str]) -> tuple[str, str | None]:
    """(speculation, draft) a server command line asks for: llama-server/BeeLlama flags or vLLM's config."""
    draft: str | None = None
    spec_type: str | None = None
    options: Mapping[str, str] = _options(command)
    for flag in ("--spec-draft-model", "-md", "--model-draft"):
        if flag in options:
            draft = Path(options[flag]).name
    spec_type = options.get("--spec-type")
    vllm = options.get("--speculative-config") or options.get("--speculative_config")
    if vllm:
        if '"ngram"' in vllm or "'ngram'" in vllm:
            return "ngram", None
        if re.search(r"[\"']method[\"']\s*:\s*[\"'](mtp|qwen3_next_mtp|deepseek_mtp)[\"']", vllm):
            return "mtp", None
        match = re.search(r"[\"']model[\"']\s*:\s*[\"']([^\"']+)", vllm)
        method = re.search(r"[\"']method[\"']\s*:\s*[\"']([^\"']+)", vllm)
        return "draft", (match.group(1) if match else method.group(1) if method else "speculative")
    if spec_type:
        if spec_type.startswith("ngram"):
            return "ngram", None
        if spec_type in ("draft-mtp", "mtp"):  # the model's own MTP head (llama.cpp's draft-mtp)
            return "mtp", None
        if spec_type != "none":
            return "draft", draft or spec_type
    if draft:
        return "draft", draft
    return "none", None


def _options(command: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for i, arg in enumerate(command):
        if arg.startswith("-") and "=" in arg:
            key, _, value = arg.partition("=")
            options[key] = value
        elif arg.startswith("-") and i + 1 < len(command):
            options[arg] = command[i + 1]
    return options



# ----------------------------------------------------------------------------------------------
# Checking a command's flags against its --help (beechat doctor)

HELP_TIMEOUT_S = 30.0
_HELP_FLAG_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w.-]*)")
_PYTHON_RE = re.compile(r"^python(?:\d+(?:\.\d+)*)?$")


def help_prefix(argv: Sequence[str]) -> list[str] | None:
    """The part of a command that `--help` goes after: the program and its leading positional words
    (`vllm serve MODEL`), or `python -m MODULE` / `python SCRIPT`; None when it cannot be told."""
    if not argv:
        return None
    if _PYTHON_RE.match(Path(argv[0]).name):
        if len(argv) >= 3 and argv[1] == "-m":
            return list(argv[:3])
        if len(argv) >= 2 and not argv[1].startswith("-"):
            return list(argv[:2])
        return None
    prefix = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("-"):
            break
        prefix.append(arg)
    return prefix


def command_flags(args: Sequence[str]) -> list[str]:
    """The flags in `args` (`--opt=value` counts as `--opt`; negative numbers are values), in order."""
    flags: list[str] = []
    for arg in args:
        if len(arg) < 2 or not arg.startswith("-") or arg == "--" or re.match(r"^-\.?\d", arg):
            continue
        flag = arg.partition("=")[0]
        if flag not in flags:
            flags.append(flag)
    return flags


def help_flags(text: str) -> set[str]:
    """Every flag a --help text mentions."""
    return {match.rstrip(".-") for match in _HELP_FLAG_RE.findall(text)}


def read_help(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
              timeout: float = HELP_TIMEOUT_S) -> tuple[str | None, str | None]:
    """(help text, None), or (None, why not) when `argv --help` cannot be read."""
    try:
        result = subprocess.run([*argv, "--help"], capture_output=True, text=True, errors="replace",
                                stdin=subprocess.DEVNULL, timeout=timeout, env={**os.environ, **(env or {})},
                                cwd=str(cwd) if cwd else None)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(argv)} --help` did not finish within {timeout:g} s"
    except OSError as exc:
        return None, f"cannot run {argv[0]}: {exc.strerror or exc}"
    text = result.stdout + "\n" + result.stderr
    if result.returncode != 0 and not help_flags(text):
        return None, f"`{' '.join(argv)} --help` exited with code {result.returncode}"
    return text, None
