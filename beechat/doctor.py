"""`beechat doctor` and `beechat plan`: what works on this machine, before loading anything big."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from beechat.config import (
    Config,
    EmbeddedSettings,
    ModelFileError,
    OpenAISettings,
    Profile,
    ServerSpec,
    check_model_file,
)
from beechat.format import human_bytes

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _check(results: list[dict[str, str]], status: str, what: str, detail: str) -> None:
    results.append({"status": status, "check": what, "detail": detail})


def check_profile(profile: Profile) -> list[dict[str, str]]:
    results: list[dict[str, str]] = []
    name, settings = profile.name, profile.settings
    if isinstance(settings, OpenAISettings):
        _check(results, OK, f"{name}: backend", f"openai server at {settings.base_url} (checked when loaded)")
        if settings.server is not None:
            results.extend(check_server_command(name, settings.server))
        return results
    from beechat.engine.chat import EngineError, resolve_flash_attn
    from beechat.engine.gguf_meta import GGUFError, read_metadata

    paths = []
    for role in ("target", "draft"):
        if role == "draft" and not settings.drafts_with_model:
            continue
        try:
            path = settings.target_path() if role == "target" else settings.draft_path()
            assert path is not None
            check_model_file(path, f"{role} model")
            meta = read_metadata(path, tensors=False)
        except (ModelFileError, GGUFError) as exc:
            _check(results, FAIL, f"{name}: {role} file", str(exc))
            continue
        paths.append((role, path))
        mtp = f", MTP layers {meta.nextn_layers}" if meta.nextn_layers else ", no MTP layers"
        _check(results, OK, f"{name}: {role} file",
               f"{path} ({human_bytes(path.stat().st_size)}, arch {meta.arch}, vocab {meta.n_vocab}{mtp})")
        if role == "target" and settings.speculation == "mtp":
            from beechat.engine.mtp import mtp_problem

            problem = mtp_problem(path)
            _check(results, FAIL if problem else OK, f"{name}: MTP drafting",
                   problem or f"{meta.nextn_layers} MTP layer(s): the target drafts for itself")
    if len(paths) == 2:
        results.append(_vocab_check(name, paths[0][1], paths[1][1]))
    try:
        flash, note = resolve_flash_attn(settings.flash_attn, settings.cache_type_v)
        _check(results, OK, f"{name}: cache types",
               f"K {settings.cache_type_k}, V {settings.cache_type_v}" + (f"; {note}" if note else ""))
        mixed = settings.cache_type_k != settings.cache_type_v and flash
        from beechat.engine.llama import supports_gpu_offload

        if mixed and supports_gpu_offload():
            _check(results, WARN, f"{name}: mixed K/V types on GPU",
                   "CUDA builds have flash-attention kernels for mixed K/V cache types only when built with "
                   "-DGGML_CUDA_FA_QUANTS=all (else context creation fails or falls back)")
    except EngineError as exc:
        _check(results, FAIL, f"{name}: cache types", str(exc))
    if paths and len(paths) == (2 if settings.drafts_with_model else 1):
        results.append(_memory_check(name, settings))
    return results


def check_server_command(name: str, spec: ServerSpec) -> list[dict[str, str]]:
    """A managed server's command: the program exists and, where it answers `--help`, every flag
    of the command is one it lists (one FAIL line per unknown flag)."""
    from beechat.backends.base import BackendError
    from beechat.backends.server import command_flags, expand_command, help_flags, help_prefix, read_help

    results: list[dict[str, str]] = []
    try:
        argv = expand_command(spec.command, spec.cwd)
    except BackendError as exc:
        _check(results, FAIL, f"{name}: server command", str(exc))
        return results
    _check(results, OK, f"{name}: server command", f"{spec.command[0]} -> {argv[0]}")
    prefix = help_prefix(argv)
    if prefix is None:
        _check(results, WARN, f"{name}: server flags", "not checked: cannot tell which program reads them")
        return results
    shown = " ".join([spec.command[0], *prefix[1:]])
    text, problem = read_help(prefix, spec.env, spec.cwd)
    known = help_flags(text) if text is not None else set()
    if not known:
        _check(results, WARN, f"{name}: server flags", f"not checked: {problem or f'`{shown} --help` lists no flags'}")
        return results
    flags = command_flags(argv[len(prefix):])
    unknown = [flag for flag in flags if flag not in known]
    for flag in unknown:
        _check(results, FAIL, f"{name}: server flag", f"unknown flag {flag} (not in `{shown} --help`)")
    if not unknown:
        _check(results, OK, f"{name}: server flags", f"all {len(flags)} flags are listed by `{shown} --help`")
    return results


def _vocab_check(name: str, target: Any, draft: Any) -> dict[str, str]:
    from beechat.engine.drafters import vocab_mismatch
    from beechat.engine.llama import LlamaError, Model

    try:
        t = Model(target, vocab_only=True)
        d = Model(draft, vocab_only=True)
    except LlamaError as exc:
        return {"status": FAIL, "check": f"{name}: vocabularies", "detail": str(exc)}
    try:
        problem = vocab_mismatch(t, d)
    finally:
        t.close()
        d.close()
    if problem:
        return {"status": FAIL, "check": f"{name}: draft/target vocabulary", "detail": problem}
    return {"status": OK, "check": f"{name}: draft/target vocabulary", "detail": f"match ({t.n_vocab} tokens)"}


def _memory_check(name: str, settings: EmbeddedSettings) -> dict[str, str]:
    from beechat.engine.planner import available_memory, plan, profile_files

    files = profile_files(settings)
    free, where = available_memory(settings.n_gpu_layers != 0)
    row = plan(files, free, settings.rollback_snapshots, settings.n_batch,
               ((settings.cache_type_k, settings.cache_type_v),))[0]
    wanted = settings.n_ctx
    detail = (f"{human_bytes(free)} free in {where}; weights {human_bytes(files.weights_bytes())}; "
              f"max context with {settings.cache_type_k}/{settings.cache_type_v}: {row.max_context}")
    if wanted == "auto":
        return {"status": OK if row.max_context else FAIL, "check": f"{name}: memory",
                "detail": detail + " (n_ctx = auto)"}
    status = OK if row.max_context >= wanted else WARN
    return {"status": status, "check": f"{name}: memory",
            "detail": detail + f"; n_ctx = {wanted}" + ("" if status == OK else " may not fit")}


def run_doctor(config: Config, only: str | None = None, as_json: bool = False) -> int:
    from beechat.engine.devices import devices
    from beechat.engine.llama import supports_gpu_offload

    results: list[dict[str, str]] = []
    try:
        import llama_cpp

        version = getattr(llama_cpp, "__version__", "?")
        _check(results, OK, "llama-cpp-python", f"version {version}")
    except Exception as exc:  # the whole engine depends on it
        _check(results, FAIL, "llama-cpp-python", f"cannot import: {exc}")
    gpu = supports_gpu_offload()
    _check(results, OK if gpu else WARN, "GPU offload",
           "supported by this build" if gpu else "not in this build (CPU only); reinstall with "
           "CMAKE_ARGS=\"-DGGML_CUDA=on\" for NVIDIA GPUs")
    for dev in devices():
        _check(results, OK, f"device {dev.name}",
               f"{dev.description}: {human_bytes(dev.free)} free of {human_bytes(dev.total)}")
    _check(results, OK, "config", config.source)
    profiles = [config.profile(only)] if only else list(config.profiles.values())
    for profile in profiles:
        results.extend(check_profile(profile))
    failed = any(r["status"] == FAIL for r in results)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": results}, indent=2))
    else:
        for r in results:
            print(f"[{r['status']:>4}] {r['check']}: {r['detail']}")
    if failed:  # docs/cli.md: exit 1 with a one-line reason when any check fails
        n_failed = sum(r["status"] == FAIL for r in results)
        print(f"beechat: error: {n_failed} doctor check{'s' if n_failed > 1 else ''} failed", file=sys.stderr)
        return 1
    return 0


def run_plan(config: Config, only: str | None, as_json: bool = False, memory_gib: float | None = None) -> int:
    from beechat.engine.planner import available_memory, plan, profile_files, recurrent_states

    profile = config.profile(only)
    settings = profile.settings
    if not isinstance(settings, EmbeddedSettings):
        raise ModelFileError(f"profile {profile.name!r} uses a server; plan needs local GGUF files")
    files = profile_files(settings)
    for path in (files.target, files.draft):
        if path is not None:
            check_model_file(path)
    if memory_gib is not None:
        free, where = int(memory_gib * (1 << 30)), "--memory"
    else:
        free, where = available_memory(settings.n_gpu_layers != 0)
    snapshots = settings.rollback_snapshots
    rows = plan(files, free, snapshots, settings.n_batch)
    states = recurrent_states(files, snapshots)
    if as_json:
        print(json.dumps({"profile": profile.name, "free_bytes": free, "memory": where,
                          "weights_bytes": files.weights_bytes(), "rows": [asdict(r) for r in rows],
                          "recurrent_state": [{**asdict(st), "total": st.total} for st in states]}, indent=2))
        return 0
    print(f"{profile.name}: {human_bytes(free)} in {where}; weights {human_bytes(files.weights_bytes())}")
    for st in states:  # included in "KV at max" below
        print(f"recurrent state, {st.model}: {st.copies} x {human_bytes(st.bytes_per_copy)} = {human_bytes(st.total)}"
              + (f" ({snapshots} rollback snapshots)" if st.model == "target" and snapshots else "")
              + (" (confirmed + draft branch)" if st.model == "draft" else ""))
    print(f"{'K/V cache':<12} {'bytes/token':>12} {'max context':>12} {'KV at max':>10}")
    for r in rows:
        per_token = f"{r.bytes_per_token:,}" if r.bytes_per_token else "unusable"
        print(f"{r.type_k + '/' + r.type_v:<12} {per_token:>12} {r.max_context:>12,} {human_bytes(r.kv_bytes):>10}")
    return 0
