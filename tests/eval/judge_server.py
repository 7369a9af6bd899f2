"""A stand-in for a remote LLM judge: a real HTTP server speaking the OpenAI chat-completions protocol.

Run as a subprocess (``python judge_server.py --port 0 --log requests.jsonl ...``); it prints ``PORT <n>`` once it
listens. It judges like a strict grader would (yes when the prediction equals the answer after normalisation) and
can be told to misbehave the ways real endpoints do: malformed replies, HTTP 500, replies slower than the client's
timeout, or dying (SIGKILL) in the middle of a run. Every request is logged, one JSON line, before it is answered,
so tests count requests on the server side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = {"question": "Question: ", "answer": "Correct Answer: ", "prediction": "Predicted Answer: "}


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def grade(answer: str, prediction: str) -> tuple[str, int]:
    if normalise(answer) == normalise(prediction):
        return "yes", 5
    return "no", 1 if normalise(answer) in normalise(prediction) else 0


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.count = 0
        self.attempts: dict[str, int] = {}
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the server

    def record(self, entry: dict) -> None:
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def _authorised(self) -> bool:
        key = self.state.args.require_key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def do_GET(self):
        if not self._authorised():
            return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        if self.path.rstrip("/").endswith("/models"):
            model = {"id": self.state.args.model, "object": "model", "created": 0, "owned_by": "test"}
            return self._send(200, {"object": "list", "data": [model]})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        st, args = self.state, self.state.args
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        fields = {}
        for name, prefix in FIELDS.items():
            match = re.search("^" + re.escape(prefix) + "(.*)$", user, re.M)
            fields[name] = match.group(1) if match else None
        key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
        with st.lock:
            st.count += 1
            number = st.count
            attempt = st.attempts[key] = st.attempts.get(key, 0) + 1
        entry = {
            "t": time.time(),
            "n": number,
            "key": key,
            "attempt": attempt,
            "model": body.get("model"),
            "temperature": body.get("temperature", "absent"),
            "max_tokens": body.get("max_tokens"),
            "system": next((m["content"] for m in body["messages"] if m.get("role") == "system"), None),
            **fields,
        }
        if args.die_after and number >= args.die_after:
            st.record({**entry, "outcome": "killed"})
            os.kill(os.getpid(), signal.SIGKILL)
        if not self._authorised():
            st.record({**entry, "outcome": "401"})
            return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        if args.echo_headers_on and args.echo_headers_on in (fields["prediction"] or ""):
            st.record({**entry, "outcome": "400-echo"})  # a proxy or server that reflects the request in its error
            headers = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
            return self._send(400, {"error": {"message": f"cannot judge this request ({headers})"}})
        if attempt <= args.rate_limit_first:
            st.record({**entry, "outcome": "429"})
            payload = json.dumps({"error": {"message": "rate limited", "type": "rate_limit_error"}}).encode()
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Retry-After", str(args.retry_after))
            self.end_headers()
            self.wfile.write(payload)
            return None
        if None in fields.values():
            st.record({**entry, "outcome": "400"})
            return self._send(400, {"error": {"message": "not a judge prompt", "type": "invalid_request_error"}})
        if attempt <= args.garbage_first:
            st.record({**entry, "outcome": "garbage"})
            payload = b"<html>502 Bad Gateway</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return None
        if attempt <= args.error_first:
            st.record({**entry, "outcome": "500"})
            return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
        if attempt <= args.sleep_first:
            st.record({**entry, "outcome": "slept"})
            time.sleep(args.sleep_s)
            return self._reply("{'pred': 'no', 'score': 0}")  # too late: the client gave up
        malformed = attempt <= args.malformed_first
        malformed |= bool(args.always_malformed) and args.always_malformed in (fields["prediction"] or "")
        if malformed:
            st.record({**entry, "outcome": "malformed"})
            return self._reply("The predicted answer looks right to me, I would say yes.")
        pred, score = grade(fields["answer"], fields["prediction"])
        st.record({**entry, "outcome": "ok", "pred": pred, "score": score})
        self._reply(f"{{'pred': '{pred}', 'score': {score}}}")

    def _reply(self, content: str) -> None:
        self._send(
            200,
            {
                "id": f"chatcmpl-{self.state.count}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.state.args.served_model or self.state.args.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
            },
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True, help="JSONL file: one line per request, written before answering")
    p.add_argument("--model", default="stand-in-judge")
    p.add_argument("--served-model", help="model name the replies report (default --model)")
    p.add_argument("--require-key", help="answer 401 unless 'Authorization: Bearer KEY'")
    p.add_argument("--malformed-first", type=int, default=0, help="malformed replies to the first N asks of a pair")
    p.add_argument("--always-malformed", help="malformed replies whenever the prediction contains this text")
    p.add_argument("--error-first", type=int, default=0, help="HTTP 500 to the first N asks of a pair")
    p.add_argument("--garbage-first", type=int, default=0, help="HTTP 200 with a non-JSON body to the first N asks")
    p.add_argument("--sleep-first", type=int, default=0, help="sleep --sleep-s before the first N replies of a pair")
    p.add_argument("--sleep-s", type=float, default=5.0)
    p.add_argument("--die-after", type=int, default=0, help="SIGKILL itself on receiving request N")
    p.add_argument("--echo-headers-on", help="HTTP 400 echoing the request headers when the prediction has this text")
    p.add_argument("--rate-limit-first", type=int, default=0, help="HTTP 429 to the first N asks of a pair")
    p.add_argument("--retry-after", default="1", help="the Retry-After header sent with a 429 (seconds or a date)")
    args = p.parse_args(argv)
    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
