"""A deterministic OpenAI-compatible chat server for the synth tests (standard library only, 127.0.0.1).

`python tests/openai_stub_server.py --delay S --fail-every K --max-requests M` prints its port on the first line of
stdout. POST /v1/chat/completions answers "a + b = X. \\boxed{X}" where a, b are the integers of the last user turn
and X is their sum, or the sum + 1 when the request's seed is divisible by 4 (a wrong answer for the verifier to
reject). The answer depends only on the request body, so a retried or repeated request gets the same text. Every
K-th request fails with 503 first (the client must retry); past M requests every request is refused with 400, so a
runaway client cannot loop. GET /stats gives {"requests": N}.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--max-requests", type=int, default=1000)
    args = parser.parse_args()
    lock = threading.Lock()
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"requests": count[0]}) if self.path == "/stats" else self._send(404, {"error": "no"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                count[0] += 1
                number = count[0]
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": f"no route {self.path}"})
            if number > args.max_requests:
                return self._send(400, {"error": "request budget of the test server exhausted"})
            if args.fail_every and number % args.fail_every == 0:
                return self._send(503, {"error": "try again"})
            time.sleep(args.delay)
            user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            a, b = (int(x) for x in re.findall(r"\d+", user)[:2])
            answer = a + b + (1 if body["seed"] % 4 == 0 else 0)
            self._send(200, {"id": f"stub-{number}", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": f"{a} + {b} = {answer}. \\boxed{{{answer}}}"}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
