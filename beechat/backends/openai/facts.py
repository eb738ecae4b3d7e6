"""What the openai backend learns about its server at load: model, context, KV cache, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from beechat.backends.base import ModelInfo
from beechat.backends.metrics import ServerLogInfo, ServerProps
from beechat.backends.server import ManagedServer, is_loopback
from beechat.backends.server_kv import kv_from_gguf, llama_server_args, local_gguf


@dataclass(slots=True)
class ServerFacts:
    """What load() learned about the server."""

    model: str
    ctx_size: int | None = None
    metrics: bool = False
    slots: bool | None = None  # None: not tried yet
    log: ServerLogInfo = field(default_factory=ServerLogInfo)
    speculation: str = "none"
    draft: str | None = None
    kv_note: str | None = None  # how the KV bytes were worked out, when not read from the log


def model_label(model_id: str) -> str:
    """A model id for display: a .gguf path shows as its file name."""
    return PurePosixPath(model_id).name if model_id.lower().endswith(".gguf") else model_id


def kv_facts(server: ManagedServer | None, base_url: str, log: ServerLogInfo, props: ServerProps,
             n_ctx_slot: int | None) -> tuple[ServerLogInfo, str | None]:
    """KV caches from the log when it has them, else worked out from the GGUF the server loaded
    (a managed server's flags, or /props of a server whose model file is on this machine)."""
    if log.kv_caches or n_ctx_slot is None:
        return log, None
    if server is not None:
        spec = server.spec
        args = llama_server_args(spec.command)
        model = local_gguf(args.model, spec.cwd) or local_gguf(props.model_path)
        draft = local_gguf(args.draft, spec.cwd) if args.draft else None
        if model is None or (args.draft and draft is None):
            return log, None
        if log.n_slots is not None:  # `load_model: initializing, n_slots = N, ..., kv_unified = '...'`
            n_slots, unified = log.n_slots, bool(log.kv_unified)
        else:  # llama-server's -np auto: 4 slots over one unified cache unless it speculates
            n_slots = props.total_slots or args.n_parallel or 1
            auto = (args.n_parallel is None and args.kv_unified is None and args.draft is None
                    and args.spec_type in (None, "none"))
            unified = bool(args.kv_unified) or (auto and n_slots > 1)
        computed = kv_from_gguf(model, n_ctx_slot, n_slots=n_slots, kv_unified=unified, args=args, draft=draft)
        note = "KV bytes worked out from the GGUF headers and the server's flags"
    else:
        # a path on the server's machine: only a loopback server's is a file on this one
        model = local_gguf(props.model_path) if is_loopback(base_url) else None
        if model is None:
            return log, None
        if (props.total_slots or 1) > 1:  # the slots may share one KV pool or not: the server does not say
            return log, None
        computed = kv_from_gguf(model, n_ctx_slot, n_slots=1, cache_types_known=False)
        note = ("KV bytes worked out from the GGUF header of the target alone, assuming llama-server's "
                "default f16 cache (the server reports neither its cache types nor a draft model)")
    if computed is None:
        return log, None
    return replace(computed, vllm_kv_bytes=log.vllm_kv_bytes), note


def model_info(profile_name: str, base_url: str, server: ManagedServer | None, facts: ServerFacts) -> ModelInfo:
    notes = [f"server: {base_url}"]
    if server is not None:
        notes.append(f"managed server log: {server.log_path}")
    if facts.kv_note:
        notes.append(facts.kv_note)
    if not facts.metrics:
        notes.append("no /metrics: draft counters only from llama-server timings "
                     "(start llama-server with --metrics)")
    return ModelInfo(
        profile=profile_name, backend="openai", target=model_label(facts.model),
        draft=facts.draft, speculation=facts.speculation, n_ctx=facts.ctx_size,
        cache_type_k=facts.log.cache_type_k, cache_type_v=facts.log.cache_type_v,
        kv_bytes_capacity=facts.log.kv_bytes_capacity, notes=tuple(notes),
    )
