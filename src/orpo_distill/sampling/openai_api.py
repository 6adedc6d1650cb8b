"""The OpenAI-compatible HTTP backend: any teacher behind vLLM, SGLang, llama.cpp, TGI or a commercial API.

Uses the official `openai` client (optional extra `api`, imported lazily), asynchronously, with our own
resilience rather than the client's: at most `concurrency` requests in flight; retries with exponential backoff
and jitter (honouring Retry-After) on 429, 408/409, 5xx, timeouts, connection errors and malformed or truncated
responses; request and token per-minute budgets (token buckets); a per-request timeout; token usage and cost
accounting. A prompt's samples are asked for in one request (`n`, prompt billed once) with a seed derived from the
run seed, the message and the first sample index; servers that ignore `n` are asked again for the rest.
A request that still fails after `max_retries` retries means the endpoint is down: the call raises
`GenerationFailed` carrying every completion obtained so far, so the stage can write them before stopping.
The API key is read from the environment variable NAMED in the config (a value that is not a variable name is
refused without being repeated), is sent only as the Authorization header, and is redacted (`secrets.redact_text`)
from every message this module logs or raises; a `base_url` carrying credentials is refused. Prompts the server
rejects (400, 413, 422: they cannot succeed by retrying) are skipped and counted per reason in `prompt_failures`,
so the stage can say why nothing came back.

Replicas: `base_url` may list several servers of the same model. Each request goes to the replica with the fewest
requests in flight (ties in turn, round-robin); a replica that fails (connection refused, 5xx, 429, timeout, a
malformed response) is skipped for `replica_cooldown_s` while the others answer, and the request moves on to the
next replica at once. Only when every replica has failed does an attempt count as failed (backoff, then retry);
after `max_retries` such rounds the endpoint is down (`GenerationFailed`). The traces do not depend on which
replica answered: the request (and its seed) is the same for every replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from ..errors import UserError
from ..secrets import check_env_var_name, check_url, redact_text
from ..tasks.prompts import chat_messages, render_prompt
from .base import Completion, GenerationFailed, SamplingParams, resolve_sample_indices, sample_seed

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "eos": "stop", "stop_sequence": "stop", "end_turn": "stop", "length": "length",
           "max_tokens": "length"}


class _Malformed(ValueError):
    """A 2xx response that is not a usable completion (missing choices, wrong types, bad JSON)."""


class _PromptFailed(Exception):
    """This prompt cannot succeed (e.g. 400: too long); other prompts go on."""


class _EndpointDown(Exception):
    """Retries exhausted, or an error no retry can fix (401/403/404): stop the run."""


class _Replicas:
    """Which replica a request goes to: fewest in flight first (ties in turn), replicas cooling down after a
    failure last; `failed(i)` starts replica i's cool-down. Plain state on the event loop's thread."""

    def __init__(self, urls: Sequence[str | None], cooldown_s: float, clock: Any = time.monotonic) -> None:
        self.urls = list(urls)
        self.cooldown_s = float(cooldown_s)
        self.clock = clock
        n = len(self.urls)
        self.busy, self.until = [0] * n, [0.0] * n
        self.requests, self.failures = [0] * n, [0] * n
        self.turn = 0

    def order(self) -> list[int]:
        """The replicas to try for one attempt: every healthy one (least busy first, ties from a rotating start),
        or, when all are cooling down, the one whose cool-down ends first."""
        n, now = len(self.urls), self.clock()
        start = self.turn
        self.turn = (self.turn + 1) % n
        healthy = sorted((i for i in range(n) if self.until[i] <= now),
                         key=lambda i: (self.busy[i], (i - start) % n))
        return healthy or [min(range(n), key=lambda i: self.until[i])]

    def failed(self, i: int) -> None:
        self.failures[i] += 1
        self.until[i] = self.clock() + self.cooldown_s

    def stats(self) -> list[dict[str, Any]]:
        return [{"base_url": u, "requests": r, "failures": f}
                for u, r, f in zip(self.urls, self.requests, self.failures)]


class _Bucket:
    """A token bucket refilled at `per_minute / 60` per second, holding at most a quarter minute's budget (so the
    first minute cannot overshoot the limit by much). `acquire` waits; `charge` settles estimates afterwards."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 4.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float) -> float:
        amount = min(float(amount), self.capacity)  # a request bigger than the bucket still goes, alone
        async with self.lock:
            self._refill()
            while self.level < amount:
                await asyncio.sleep((amount - self.level) / self.rate)
                self._refill()
            self.level -= amount
        return amount

    def charge(self, amount: float) -> None:
        self._refill()
        self.level -= amount  # may go negative: later requests wait for the debt to be paid


def _server_message(e: Any) -> str:
    """The server's own error message of an `openai.APIStatusError` (the `error.message` of its JSON body when it
    has one), at most 300 characters; callers redact it."""
    body = getattr(e, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
    text = str(msg or getattr(e, "message", "") or e)
    return text if len(text) <= 300 else text[:297] + "..."


def _split_tokens(total: int, texts: list[str]) -> list[int]:
    """Apportion a response's completion tokens to its choices by text length (exact for n=1)."""
    if len(texts) == 1:
        return [total]
    weights = [max(1, len(t)) for t in texts]
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


class OpenAIGenerator:
    """Sample from an OpenAI-compatible endpoint (chat or completions). See the module docstring."""

    def __init__(self, *, model: str, base_url: str | Sequence[str] | None = None, api_key_env: str | None = None,
                 endpoint: str = "chat", model_id: str | None = None, revision: str = "unpinned",
                 template: str = "auto", system_prompt: str | None = None, tokenizer: Any = None,
                 concurrency: int = 8, max_retries: int = 6, timeout_s: float = 120.0,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 cost_per_1k_input: float = 0.0, cost_per_1k_output: float = 0.0, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0, chunk_prompts: int | None = None,
                 replica_cooldown_s: float = 30.0) -> None:
        if endpoint not in ("chat", "completions"):
            raise UserError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        if endpoint == "completions" and template == "chat" and tokenizer is None:
            raise UserError("endpoint: completions with template: chat needs the model's tokenizer to render the "
                             "chat template locally; use endpoint: chat, or template: plain")
        urls = [base_url] if base_url is None or isinstance(base_url, str) else [str(u) for u in base_url]
        if not urls:
            raise UserError("base_url: an empty list; give one URL or a list of replica URLs")
        for i, u in enumerate(urls):
            check_url(u, "base_url" if len(urls) == 1 else f"base_url[{i}]")
        check_env_var_name(api_key_env or None, "api_key_env")
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(f"api_key_env names the environment variable {api_key_env!r}, which is not set "
                                 "(or empty); export it before running")
        else:
            key = "EMPTY"  # local servers take any key; we never fall back to OPENAI_API_KEY for an arbitrary URL
        self._api_key = key
        self.model = model
        self.base_urls = urls
        self.base_url = urls[0] if len(urls) == 1 else ", ".join(str(u) for u in urls)  # for messages
        self.replicas = _Replicas(urls, replica_cooldown_s)  # cool-downs span calls (the stage's chunks)
        self.api_key_env = api_key_env
        self.endpoint = endpoint
        self.model_id = model_id or model
        self.revision = revision
        self.template = template
        self.system_prompt = system_prompt
        self.tokenizer = tokenizer
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.cost_per_1k_input = float(cost_per_1k_input)
        self.cost_per_1k_output = float(cost_per_1k_output)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.chunk_prompts = int(chunk_prompts or max(16, 4 * self.concurrency))
        self.error_count = 0  # failed attempts (each retried or final), for honest progress and reports
        self.errors_by_kind: dict[str, int] = {}
        self.prompt_failures: dict[str, int] = {}  # redacted reason ("HTTP 400: <server message>") -> prompts
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        self._jitter = random.Random()

    def __repr__(self) -> str:  # never shows the key
        urls = self.base_urls if len(self.base_urls) > 1 else self.base_url
        return (f"OpenAIGenerator(model={self.model!r}, base_url={urls!r}, endpoint={self.endpoint!r}, "
                f"api_key_env={self.api_key_env!r})")

    @classmethod
    def from_config(cls, cfg, *, revision: str | None = None, **kwargs: Any) -> OpenAIGenerator:
        from .stage import model_identity

        if not cfg.model:
            raise UserError("backend: openai needs `model:` (the served model name)")
        model_id, rev = model_identity(cfg)
        args: dict[str, Any] = dict(
            model=cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, endpoint=cfg.endpoint,
            model_id=model_id, revision=revision or rev, template=cfg.template, system_prompt=cfg.system_prompt,
            concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
            requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute,
            cost_per_1k_input=cfg.cost_per_1k_input, cost_per_1k_output=cfg.cost_per_1k_output,
            replica_cooldown_s=getattr(cfg, "replica_cooldown_s", 30.0))
        args.update(kwargs)
        return cls(**args)

    # -- secrets -----------------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        """`text` with the API key, URL credentials and key-shaped tokens replaced by ***."""
        return redact_text(text, [self._api_key])

    # -- the interface -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 sample_indices: Sequence[Sequence[int]] | None = None) -> list[list[Completion]]:
        sample_indices = resolve_sample_indices(len(prompts), params, sample_indices)
        coro = self._generate([str(p) for p in prompts], params, [list(i) for i in sample_indices])
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside an event loop (a notebook): run ours in a worker thread.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def _generate(self, prompts: list[str], params: SamplingParams,
                        indices: list[list[int]]) -> list[list[Completion]]:
        try:
            import openai
        except ImportError:
            raise ImportError("backend: openai needs the `openai` package: pip install 'orpo-distill[api]'") from None
        clients = [openai.AsyncOpenAI(base_url=u, api_key=self._api_key, max_retries=0, timeout=self.timeout_s)
                   for u in self.base_urls]
        sem = asyncio.Semaphore(self.concurrency)
        rpm = _Bucket(self.requests_per_minute) if self.requests_per_minute else None
        tpm = _Bucket(self.tokens_per_minute) if self.tokens_per_minute else None
        results: list[list[Completion] | None] = [None] * len(prompts)
        down: list[str] = []

        async def one(p: int) -> None:
            if not indices[p]:
                results[p] = []
                return
            async with sem:
                if down:  # the endpoint is declared down: launch nothing new
                    return
                try:
                    results[p] = await self._all_samples(clients, openai, prompts[p], params, indices[p], rpm,
                                                         tpm, down)
                except _PromptFailed as e:
                    reason = self.redact(str(e))
                    self.prompt_failures[reason] = self.prompt_failures.get(reason, 0) + 1
                    log.warning("prompt %d failed and is skipped (a re-run retries it): %s", p, reason)
                except _EndpointDown as e:
                    if not down:
                        down.append(str(e))

        try:
            await asyncio.gather(*(one(p) for p in range(len(prompts))))
        finally:
            for client in clients:
                await client.close()
        if down:
            raise GenerationFailed(self.redact(down[0]), partial=results)
        return [r if r is not None else [] for r in results]

    async def _all_samples(self, clients, openai, message: str, params: SamplingParams, idx: list[int],
                           rpm, tpm, down: list[str]) -> list[Completion]:
        got: list[Completion] = []
        while len(got) < len(idx):
            need = len(idx) - len(got)
            # 31 bits: some servers reject larger seeds.
            seed = sample_seed(params.seed, message, idx[len(got)]) & 0x7FFFFFFF
            got.extend((await self._request(clients, openai, message, params, need, seed, rpm, tpm, down))[:need])
        return got

    def _request_args(self, message: str, params: SamplingParams, n: int, seed: int) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model, "n": n, "temperature": params.temperature,
                                "top_p": params.top_p, "max_tokens": params.max_new_tokens, "seed": seed}
        if params.stop:
            args["stop"] = list(params.stop)
        if self.endpoint == "chat":
            args["messages"] = chat_messages(message, self.system_prompt)
        elif self.tokenizer is not None:
            args["prompt"] = render_prompt(self.tokenizer, message, self.template, self.system_prompt)
        else:  # plain template: the system prompt (instructions, few-shot examples) goes before the question
            args["prompt"] = render_prompt(None, message, "plain", self.system_prompt)
        return args

    def _record_error(self, kind: str) -> None:
        self.error_count += 1
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    async def _request(self, clients, openai, message: str, params: SamplingParams, n: int, seed: int, rpm, tpm,
                       down: list[str]) -> list[Completion]:
        """One request's completions: an attempt tries the replicas in `_Replicas.order()` until one answers (a
        failing one starts its cool-down); an attempt in which every replica tried failed backs off and retries,
        at most `max_retries` times, then the endpoint is down."""
        args = self._request_args(message, params, n, seed)
        last = "no attempt was made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            for i in self.replicas.order():
                if down:
                    raise _EndpointDown(down[0])
                got = await self._try_replica(clients[i], i, openai, message, params, args, n, rpm, tpm)
                if isinstance(got, list):
                    return got
                last, ra = got
                if ra is not None:
                    retry_after = ra if retry_after is None else min(retry_after, ra)
                if len(self.base_urls) > 1:
                    log.info("replica %d (%s) failed (%s); skipped for %g s", i, self.base_urls[i],
                             self.redact(last), self.replicas.cooldown_s)
            if attempt == self.max_retries:
                break
            delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)) * self._jitter.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = min(self.backoff_max_s, max(delay, retry_after))
            log.info("request failed (%s); retry %d/%d in %.2f s", self.redact(last), attempt + 1,
                     self.max_retries, delay)
            await asyncio.sleep(delay)
        where = (f"the endpoint {self.base_url}" if len(self.base_urls) == 1
                 else f"every replica of the endpoint ({self.base_url})")
        raise _EndpointDown(self.redact(
            f"{where} (model {self.model!r}) failed {self.max_retries + 1} times in a row; last error: {last}"))

    async def _try_replica(self, client, i: int, openai, message: str, params: SamplingParams,
                           args: dict[str, Any], n: int, rpm, tpm) -> list[Completion] | tuple[str, float | None]:
        """One call to replica `i`: its completions, or (reason, Retry-After seconds) for a failure a retry may
        fix (the replica then cools down). Raises `_EndpointDown` (401/403/404) and `_PromptFailed` (400...)."""
        call = client.chat.completions.create if self.endpoint == "chat" else client.completions.create
        estimate = len(message) / 4 + params.max_new_tokens * n
        url = self.base_urls[i]
        if rpm is not None:
            await rpm.acquire(1)
        reserved = await tpm.acquire(estimate) if tpm is not None else 0.0
        t0 = time.perf_counter()
        retry_after = None
        self.replicas.busy[i] += 1
        self.replicas.requests[i] += 1
        try:
            resp = await asyncio.wait_for(call(**args), timeout=self.timeout_s + 5)
            comps = self._parse(resp, n, time.perf_counter() - t0)
            used = sum(c.n_tokens for c in comps) + (comps[0].prompt_tokens if comps else 0)
            if tpm is not None:
                tpm.charge(used - reserved)
            self.usage["requests"] += 1
            return comps
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            self._record_error(f"http_{e.status_code}")
            hint = {401: f"authentication failed: check the key in the environment variable "
                         f"{self.api_key_env!r}" if self.api_key_env else "authentication failed: the server "
                         "wants an API key; put it in an environment variable and name it in api_key_env",
                    403: "permission denied for this model or key",
                    404: f"not found: check base_url ({url}) and the model name ({self.model!r})"}
            raise _EndpointDown(self.redact(f"{url}: HTTP {e.status_code}: {hint[e.status_code]} "
                                            f"({_server_message(e)})")) from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status in (408, 409, 429) or status >= 500:
                kind = f"http_{status}"
                ra = e.response.headers.get("retry-after") if e.response is not None else None
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
            else:  # 400, 413, 422...: this prompt will not succeed by retrying
                self._record_error(f"http_{status}")
                raise _PromptFailed(self.redact(f"HTTP {status}: {_server_message(e)}")) from None
            last = f"HTTP {status}: {_server_message(e)}"
        except openai.APITimeoutError:
            kind, last = "timeout", f"no response within {self.timeout_s:g} s"
        except asyncio.TimeoutError:
            kind, last = "timeout", f"no response within {self.timeout_s:g} s"
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e.__context__
            kind, last = "connection", f"connection error ({type(cause).__name__ if cause else 'unknown'})"
        except openai.APIError as e:  # any other client-side API error (e.g. response validation)
            kind, last = "api_error", f"{type(e).__name__}: {str(e)[:200]}"
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            # JSON that does not parse (malformed or cut short) or a response without usable choices.
            kind, last = "malformed", f"malformed response ({type(e).__name__}: {str(e)[:200]})"
        finally:
            self.replicas.busy[i] -= 1
        self._record_error(kind)
        self.replicas.failed(i)
        if tpm is not None:
            tpm.charge(-reserved)  # a failed request used (almost) nothing
        return (last if len(self.base_urls) == 1 else f"{url}: {last}"), retry_after

    def _parse(self, resp: Any, n: int, latency: float) -> list[Completion]:
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise _Malformed("the response has no choices")
        choices = sorted(choices, key=lambda c: getattr(c, "index", 0) or 0)
        texts, reasons = [], []
        for c in choices:
            reason = getattr(c, "finish_reason", None)
            if self.endpoint == "chat":
                msg = getattr(c, "message", None)
                text = getattr(msg, "content", None)
                if msg is None or (text is None and reason is None):
                    raise _Malformed("a choice has no message content")
                text = text or ""
            else:
                text = getattr(c, "text", None)
                if not isinstance(text, str):
                    raise _Malformed("a choice has no text")
            if not isinstance(text, str):
                raise _Malformed("a choice's content is not a string")
            texts.append(text)
            reasons.append(_FINISH.get(reason, str(reason) if reason else "unknown"))
        usage = getattr(resp, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        if not isinstance(completion_tokens, int):
            # No usage block (some servers): a rough 4-characters-per-token estimate.
            completion_tokens = sum(max(1, round(len(t) / 4)) for t in texts)
        if not isinstance(prompt_tokens, int):
            prompt_tokens = 0
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        per = _split_tokens(completion_tokens, texts)
        return [Completion(text=t, n_tokens=k, finish_reason=r, latency_s=latency, prompt_tokens=prompt_tokens)
                for t, k, r in zip(texts, per, reasons)]
