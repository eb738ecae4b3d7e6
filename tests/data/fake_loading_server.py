"""A stand-in for llama-server's startup: /health answers 503 "Loading model" for a while, then 200.

Usage: fake_loading_server.py PORT LOADING_SECONDS [--child]
With --child it also starts a long-running child process (to check that the whole group is stopped).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import time

port, loading_s = int(sys.argv[1]), float(sys.argv[2])
if "--child" in sys.argv:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
started = time.monotonic()
print("llama_kv_cache: size =   12.00 MiB (  1024 cells,   4 layers,  1/1 seqs), "
      "K (q8_0):    6.00 MiB, V (q8_0):    6.00 MiB", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if time.monotonic() - started < loading_s:
            self.send_json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        elif self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model",
                                                             "meta": {"n_ctx": 1024}}]})
        else:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
