"""llama.cpp's own server (xllamacpp) on loopback, as a test peer, with llama-server's flag names.

Runs in its own process, never inside pytest: xllamacpp carries its own llama.cpp build, which must
not share a process with llama-cpp-python's libraries. The flags are a subset of llama-server's,
spelled the same, so a profile's `[server] command` that starts this script is read by beechat as it
would read a real llama-server's (model, draft, context, cache types). Prints `listening on URL`
once the model is loaded and the HTTP listener is up, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

CACHE_TYPES = ("f16", "q8_0", "q4_0")
SPEC_TYPES = ("none", "draft-simple", "ngram-simple")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (one slot)")
    parser.add_argument("--spec-type", choices=SPEC_TYPES, default="none")
    parser.add_argument("-md", "--spec-draft-model", help="draft GGUF for draft-simple (default: the model)")
    parser.add_argument("--spec-draft-n-max", type=int, default=8)
    parser.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16")
    parser.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-lv", "--verbosity", type=int, default=3, help="4 prints llama.cpp's own INFO lines")
    parser.add_argument("--metrics", action="store_true", help="accepted for llama-server parity (always on)")
    args = parser.parse_args()

    import xllamacpp as xlc

    def ggml_type(name: str) -> object:
        return getattr(xlc.ggml_type, f"GGML_TYPE_{name.upper()}")

    params = xlc.CommonParams()
    params.model.path = args.model
    params.n_ctx = args.ctx_size
    params.n_parallel = 1
    params.port = args.port
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.endpoint_props = True
    params.warmup = False
    params.verbosity = args.verbosity
    params.cache_type_k = ggml_type(args.cache_type_k)
    params.cache_type_v = ggml_type(args.cache_type_v)
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    spec = params.speculative
    if args.spec_type == "draft-simple":
        spec.types = [xlc.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
        spec.draft.mparams.path = args.spec_draft_model or args.model
        spec.draft.n_max = args.spec_draft_n_max
        spec.draft.n_min = 0
        spec.draft.cpuparams.n_threads = args.threads
        spec.draft.cpuparams_batch.n_threads = args.threads
    elif args.spec_type == "ngram-simple":
        spec.types = [xlc.common_speculative_type.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
        spec.ngram_simple.size_n = 3
        spec.ngram_simple.size_m = args.spec_draft_n_max
        spec.ngram_simple.min_hits = 1
    server = xlc.Server(params)  # returns once the model is loaded and the listener is up
    print(f"listening on {server.listening_address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
