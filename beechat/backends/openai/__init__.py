"""The openai backend: any OpenAI-compatible server (llama-server, BeeLlama, vLLM, llama_cpp.server).

Replies stream over SSE from `POST {base_url}/chat/completions`. Stats are what the server reports
(llama-server `timings`, Prometheus `/metrics`, `/props`, `/slots`, a managed server's log) plus
decode tok/s measured on the stream; whatever a server does not say stays None. The API key is
read from the environment at each request and never kept, shown or logged.

Modules: backend (the Backend), stream (payloads to typed events), sse, errors (one-line texts),
stats, facts (what load learns about the server), tokens (counts and estimates), transport (auth,
cancel), reply (the state of a reply being streamed).
"""

from beechat.backends.openai.backend import OpenAIBackend
from beechat.backends.openai.errors import http_error_text, one_line
from beechat.backends.openai.sse import SSEEvent, StreamError, decode_payloads, iter_sse
from beechat.backends.openai.tokens import estimate_tokens

__all__ = [
    "OpenAIBackend",
    "SSEEvent",
    "StreamError",
    "decode_payloads",
    "estimate_tokens",
    "http_error_text",
    "iter_sse",
    "one_line",
]
