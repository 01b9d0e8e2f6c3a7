"""The server behind fake_peer.sh: vLLM's OpenAI API as ``pdserve bench`` uses it.

``python fake_peer_server.py MODEL PORT RUN_DIR``. ``GET /health``, ``GET /v1/models`` (model
``peer``), and streamed ``POST /v1/completions`` of token-id prompts: ``max_tokens`` tokens
(two without ``ignore_eos``, as if EOS came), every third one a chunk without text (a held-back
byte) but counted by the running usage of ``continuous_usage_stats``, then a usage chunk and
``[DONE]``. Each request's body is appended to ``RUN_DIR/bodies.jsonl``. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

GAP_S = 0.002


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    run_dir = Path(".")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b"")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "peer"}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with (self.run_dir / "bodies.jsonl").open("a") as out:
            out.write(json.dumps(body) + "\n")
        prompt = body.get("prompt")
        if self.path != "/v1/completions" or body.get("model") != "peer":
            self._send(404, b'{"error": {"message": "no such model or path"}}')
        elif not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            self._send(400, b'{"error": {"message": "prompt must be token ids"}}')
        else:
            self._stream(body, len(prompt))

    def _stream(self, body: dict[str, Any], prompt_len: int) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        options = body.get("stream_options") or {}
        n = body["max_tokens"] if body.get("ignore_eos") else min(2, body["max_tokens"])
        for k in range(n):
            time.sleep(GAP_S)
            last = k == n - 1
            choice: dict[str, Any] = {"index": 0, "text": "" if k % 3 == 1 and not last else "x"}
            choice["finish_reason"] = None
            choice["finish_reason"] = (
                ("length" if body.get("ignore_eos") else "stop") if last else None
            )
            chunk: dict[str, Any] = {"object": "text_completion", "choices": [choice]}
            if options.get("continuous_usage_stats"):
                chunk["usage"] = {"prompt_tokens": prompt_len, "completion_tokens": k + 1}
            self._chunk(chunk)
        if options.get("include_usage"):
            self._chunk(
                {"choices": [], "usage": {"prompt_tokens": prompt_len, "completion_tokens": n}}
            )
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, doc: object) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        data = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main() -> None:
    model, port, run_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if os.environ.get("FAKE_PEER_FAIL"):
        print(f"refusing to serve {model}", flush=True)
        sys.exit(3)
    (run_dir / "model").write_text(f"{model} {os.environ['PEER_DTYPE']}")
    Handler.run_dir = run_dir
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
