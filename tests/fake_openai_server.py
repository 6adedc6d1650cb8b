"""A real OpenAI-compatible HTTP server on loopback for the tests: deterministic completions, injected faults.

`FakeOpenAIServer(faults=Faults(rate=0.3))` serves `/v1/chat/completions` and `/v1/completions` with FastAPI +
uvicorn on 127.0.0.1 and a free port, in a thread. Each completion is a pure function of (prompt, seed, choice
index), so a run with faults must end with exactly the traces of a run without. Faults are drawn per request from a
seeded RNG: 429 (with Retry-After), 500, a response slower than the client's timeout, malformed JSON, a JSON body
cut in half, a response with a missing `choices` field, and a connection dropped mid-body. The server counts what it
injected, so a test can check the client's error count is honest. It can also require an API key and, like a
careless proxy, echo the Authorization header in its error bodies (to prove the client never repeats it).
Run it standalone: `python tests/fake_openai_server.py --port 8000 --rate 0.2`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field

# Module level on purpose: FastAPI resolves the handlers' `Request` annotation in this module's namespace.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

FAULT_KINDS = ("429", "500", "timeout", "malformed", "truncated", "no_choices", "disconnect")


@dataclass
class Faults:
    rate: float = 0.0  # probability that a request gets a fault
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_s: float = 3.0  # how long a "timeout" response takes (set the client timeout below it)
    down: bool = False  # every request answers 503
    down_after: int | None = None  # serve this many requests normally, then answer 503 forever
    retry_after_s: float = 0.05


def fake_completion(prompt: str, seed: int, index: int) -> str:
    """Deterministic text for a prompt: for 'What is A + B?' a short chain of thought whose answer is right for
    two of three (seed, index) draws."""
    h = int(hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).hexdigest(), 16)
    m = re.search(r"What is (\d+) \+ (\d+)\?", prompt)
    if not m:
        return f"Reply {h % 100000} to your message."
    a, b = int(m.group(1)), int(m.group(2))
    ans = a + b if h % 3 else a + b + 1 + h % 5
    style = ["First", "We start:", "Let us see.", "Compute:"][h % 4]
    return f"{style} {a} plus {b}, variant {h % 997}. The answer is {ans}."


@dataclass
class ServerStats:
    requests: int = 0
    ok: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    auth_headers: list[str] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


class FakeOpenAIServer:
    def __init__(self, faults: Faults | None = None, *, api_key: str | None = None, echo_auth: bool = False,
                 honour_n: bool = True, reject_substring: str | None = None, port: int = 0) -> None:
        self.faults = faults or Faults()
        self.reject_substring = reject_substring  # prompts containing it get a 400 (a prompt that cannot succeed)
        self.api_key = api_key
        self.echo_auth = echo_auth
        self.honour_n = honour_n
        self.stats = ServerStats()
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._port = port
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- the app ---------------------------------------------------------------------------------------------
    def _build_app(self):
        app = FastAPI()

        def err(status: int, msg: str, auth: str | None, headers: dict | None = None):
            if self.echo_auth and auth:
                msg += f" (received Authorization: {auth})"
            body = {"error": {"message": msg, "type": "fake", "code": status}}
            return JSONResponse(body, status_code=status, headers=headers)

        async def handle(request: Request, chat: bool):
            auth = request.headers.get("authorization")
            raw = await request.body()
            with self._lock:
                self.stats.requests += 1
                nreq = self.stats.requests
                self.stats.auth_headers.append(auth or "")
                draw = self._rng.random()
                kind = self._rng.choice(self.faults.kinds) if self.faults.kinds else None
            down = self.faults.down or (self.faults.down_after is not None and nreq > self.faults.down_after)
            if self.api_key is not None and auth != f"Bearer {self.api_key}":
                return err(401, "invalid api key", auth)
            if down:
                self._count("down")
                return err(503, "service unavailable (down)", auth)
            fault = kind if draw < self.faults.rate else None
            if fault == "429":
                self._count(fault)
                return err(429, "rate limited", auth, {"retry-after": str(self.faults.retry_after_s)})
            if fault == "500":
                self._count(fault)
                return err(500, "internal error", auth)
            if fault == "timeout":
                self._count(fault)
                await asyncio.sleep(self.faults.slow_s)
            try:
                body = json.loads(raw)
            except ValueError:
                return err(400, "request body is not JSON", auth)
            with self._lock:
                self.stats.bodies.append(body)
            if self.reject_substring and self.reject_substring in raw.decode("utf-8", "replace"):
                self._count("rejected")
                return err(400, "this prompt is too long for the context window", auth)
            n = int(body.get("n") or 1) if self.honour_n else 1
            seed = int(body.get("seed") or 0)
            if chat:
                prompt = body["messages"][-1]["content"]
            else:
                prompt = body["prompt"]
            max_tokens = int(body.get("max_tokens") or 10**6)
            stops = body.get("stop") or []
            stops = [stops] if isinstance(stops, str) else stops
            choices, used = [], 0
            for i in range(n):
                text = fake_completion(prompt, seed, i)
                words = text.split(" ")
                reason = "stop"
                if len(words) > max_tokens:
                    text, reason = " ".join(words[:max_tokens]), "length"
                for s in stops:
                    if s and s in text:
                        text, reason = text[:text.index(s)], "stop"
                used += len(text.split())
                choice = {"index": i, "finish_reason": reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choices.append(choice)
            payload = {"id": f"fake-{nreq}", "object": "chat.completion" if chat else "text_completion",
                       "created": int(time.time()), "model": body.get("model", "fake"), "choices": choices,
                       "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": used,
                                 "total_tokens": len(prompt.split()) + used}}
            data = json.dumps(payload)
            if fault == "malformed":
                self._count(fault)
                return Response("{'this is': not json,,", media_type="application/json")
            if fault == "truncated":
                self._count(fault)
                return Response(data[: len(data) // 2], media_type="application/json")
            if fault == "no_choices":
                self._count(fault)
                payload.pop("choices")
                return JSONResponse(payload)
            if fault == "disconnect":
                self._count(fault)

                async def dribble():
                    yield data[: len(data) // 3].encode()
                    raise ConnectionResetError("fake server drops the connection mid-body")

                return StreamingResponse(dribble(), media_type="application/json",
                                         headers={"content-length": str(len(data))})
            with self._lock:
                self.stats.ok += 1
            return Response(data, media_type="application/json")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, False)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

        return app

    def _count(self, kind: str) -> None:
        with self._lock:
            self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self.port = sock.getsockname()[1]
        # log_config=None: uvicorn's default calls logging.config.dictConfig, which closes every handler ever
        # created in the process (absl's included, bound to a test's captured stderr), breaking later tests.
        config = uvicorn.Config(self.app, log_level="critical", log_config=None, timeout_graceful_shutdown=1,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.02)
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--down-after", type=int, default=None)
    a = ap.parse_args()
    srv = FakeOpenAIServer(Faults(rate=a.rate, seed=a.seed, down_after=a.down_after), port=a.port)
    print(srv.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
