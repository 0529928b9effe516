"""Generation and judge scoring through an OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp).

How a 70B simulated user or a judge on another machine reaches the env: ``OpenAIEngine(model, base_url)`` sends
each prompt of a batch as its own request, all at once from one asyncio loop (a background thread, so callers
stay synchronous and notebooks with their own loop work), at most ``max_concurrency`` in flight.

Two APIs:

- ``api="completions"`` (default; vLLM's server): the env renders every prompt to token ids with the model's
  tokenizer and chat template *here* and sends the ids (``POST /v1/completions`` with a token-id ``prompt``).
  The server answers with the sampled token ids (``return_token_ids``, a vLLM extension) and the prompt ids it
  used, which are checked against the ids sent; the text is decoded here from the ids. What the env records is
  exactly what the server saw and sampled, as with the in-process engines. The judge reads the log-probs of the
  nine digit tokens with vLLM's ``logprob_token_ids`` (exact, whatever the server's ``--logprobs-mode``).
  Sampled log-probs follow the server's ``--logprobs-mode``: start it with ``--logprobs-mode
  processed_logprobs`` to get the :class:`~dialogue_gym.generation.base.Generation` contract (log-probs under
  ``logits / temperature``, as :class:`~dialogue_gym.generation.vllm.VLLMEngine` returns).
- ``api="chat"`` (any server that only takes chat messages, e.g. a hosted API): ``POST /v1/chat/completions``
  with the messages; the server renders them with *its* chat template. Nothing here is token-exact: the
  recorded ``prompt_token_ids`` are the local rendering (equal to what the server saw only when its template
  is the local one), ``token_ids`` re-tokenise the returned text (not necessarily the sampled ids), sampled
  log-probs are not available, and the judge reads the digits from the top 20 log-probs of the first token
  (renormalised over the digits found there; a warning says when some were missing).

Requests carry per-row seeds (``seed``), so a row's output depends on its prompt and seed only, as in
:class:`~dialogue_gym.generation.vllm.VLLMEngine` (vLLM samples a seeded request with its own generator).

Faults. ``timeout_s`` is one deadline for a whole HTTP request (connect, send, and the whole answer read), not
for each read, so a server that trickles its answer cannot hold a step for longer. Timeouts, refused or dropped
connections and HTTP 429/500/502/503/504 are retried ``max_retries`` times with exponential backoff (or the
server's ``Retry-After`` when longer), each wait capped at :data:`MAX_RETRY_AFTER_S` seconds, jitter included;
then, like any other HTTP error, a body over ``max_body_bytes`` or an answer with an unusable field (every field is
checked, for both APIs, in :mod:`dialogue_gym.generation.http_answers`: token ids in the vocabulary, no more than
``max_tokens``, log-probs that are numbers and not NaN, ...), a :class:`ServerError` names the server, the model,
the status and the field. A batch fails as a whole (no partial results), and the env steps copies of its states,
so a failed step leaves every episode as it was. Messages are made in one place
(:func:`~dialogue_gym.generation.http_common.server_error`), which redacts the API key, ``Bearer`` tokens and URL
passwords, also in quoted error bodies of servers that echo the request's headers.

The API key is read from the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``) at
each request and never stored on the engine, so it cannot reach states, configs, logs or the rollout store;
without the variable no ``Authorization`` header is sent (a local vLLM server needs none).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dialogue_gym.generation.base import (
    Generation,
    Prompt,
    SamplingParams,
    check_generate_args,
    is_token_prompt,
    prompt_token_ids,
)
from dialogue_gym.generation.http_answers import AnswerError, read_candidate_logprobs, read_generation, read_models
from dialogue_gym.generation.http_common import (
    ServerError,
    check_base_url,
    retry_after,
    retry_wait,
    server_error,
    tokenizer_for,
)

APIS = ("completions", "chat")
RETRY_STATUSES = (429, 500, 502, 503, 504)
CHAT_TOP_LOGPROBS = 20  # the most OpenAI's chat API (and vLLM's default max_logprobs) allows
MAX_RETRY_AFTER_S = 30.0  # the longest wait before a retry, jitter included, whatever Retry-After asks
MAX_BODY_BYTES = 16 * 2**20  # default answer-size cap: ~10x a 32k-token completion with ids and log-probs


class _Retryable(Exception):
    def __init__(self, what: str, status: int | None = None, wait_s: float | None = None, body: str | None = None):
        super().__init__(what)
        self.what, self.status, self.wait_s, self.body = what, status, wait_s, body


class OpenAIEngine:
    """A generation engine (and next-token scorer) on an OpenAI-compatible server.

    Args:
        model: the served model name (``--served-model-name``, by default what ``vllm serve`` was given). It also
            names the tokenizer loaded here (``"embedded"``, ``"tiny"``, a directory, a hub id in the local
            cache), which renders the prompts in ``api="completions"``.
        base_url: the server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``.
        api: ``"completions"`` (token ids in and out; vLLM) or ``"chat"`` (chat messages; any server).
        api_key_env: the environment variable that holds the API key (read at each request, never stored).
        max_concurrency: most requests in flight at once.
        timeout_s: deadline in seconds for each HTTP request as a whole (connect, send and reading the whole
            answer); each retry gets a new one, so a call takes at most about ``(max_retries + 1) * timeout_s``
            plus the waits between tries.
        max_retries: retries after the first attempt for timeouts, connection errors and 429/5xx answers.
        backoff_s: wait before the first retry; doubled after every retry.
        seed: seeds the stream that gives seeds to rows that come without one.
        max_body_bytes: the largest answer body read (after decompression); a larger one is refused.
        check: ask ``GET /models`` now and fail fast when the server is down or does not serve ``model``.

    Raises:
        ValueError: a bad setting (named).
        ServerError: ``check`` and the server is unreachable or does not serve ``model``.
    """

    token_prompts = True  # judges may pass token-id prompts (False for api="chat")

    def __init__(self, model: str, base_url: str, *, api: str = "completions", api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 32, timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 0.5,
                 seed: int = 0, max_body_bytes: int = MAX_BODY_BYTES, check: bool = True):
        import httpx

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be the served model name, got {model!r}")
        self.base_url = check_base_url(base_url)
        if api not in APIS:
            raise ValueError(f"api is {api!r}; allowed: {', '.join(APIS)}")
        if not isinstance(api_key_env, str) or not api_key_env.strip():
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        for name, value, low in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0),
                                 ("max_body_bytes", max_body_bytes, 1024)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not timeout_s > 0 or not backoff_s >= 0:
            raise ValueError(f"timeout_s must be > 0 and backoff_s >= 0, got {timeout_s!r} and {backoff_s!r}")
        self.name = model
        self.api = api
        self.token_prompts = api == "completions"
        self.api_key_env = api_key_env
        self.max_concurrency, self.timeout_s = max_concurrency, float(timeout_s)
        self.max_retries, self.backoff_s = max_retries, float(backoff_s)
        self.max_body_bytes = max_body_bytes
        self.tokenizer = tokenizer_for(model)
        self.vocab_size = len(self.tokenizer)  # ids the tokenizer decodes; a sampled id must be below
        self.eos_ids = sorted({int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set())
        self._rng = np.random.default_rng(seed)
        self.tokens_generated = 0  # running count of sampled tokens, for benchmarks and budgets
        self.requests = 0  # HTTP requests sent, retries included
        self._warned_missing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"openai-engine-{model}", daemon=True)
        self._thread.start()
        self._sem = asyncio.Semaphore(max_concurrency)
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
        if check:
            try:
                self.check_server()
            except BaseException:
                self.close()
                raise

    def describe(self) -> dict[str, Any]:
        """What the engine computes, for env fingerprints: the served model and the API, not the server's address
        (a state saved with one server restores with another serving the same model) and never the key."""
        return {"engine": "openai", "model": self.name, "api": self.api}

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.name!r}, base_url={self.base_url!r}, api={self.api!r})"

    # ---- server check ------------------------------------------------------------------------------------------

    def check_server(self) -> list[str]:
        """``GET /models`` once (no retries): the served model names. Raises :class:`ServerError` naming the URL
        when the server is down, answers badly, or does not serve ``model``."""
        served = self._run(self._request("GET", "/models", None, read_models, retries=0))
        if self.name not in served:
            raise self._error(f"the server at {self.base_url} serves {served}, not {self.name!r}; start it with "
                              f"--served-model-name {self.name} or set the model to one it serves")
        return served

    # ---- generation ----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False) -> list[Generation]:
        """Generate one continuation per prompt, all requests concurrently (see the module docstring).

        Raises:
            ValueError: empty prompts, a seed count that does not match, token-id prompts or log-probs with
                ``api="chat"``.
            ServerError: the server failed (after retries) or answered something unusable.
        """
        self._check_open()
        check_generate_args(prompts, params, seeds)
        if self.api == "chat" and return_logprobs:
            raise ValueError("api='chat' cannot return log-probs aligned with token ids; use api='completions' "
                             "(a vLLM server) for log-probs")
        for i, p in enumerate(prompts):
            self._check_prompt(i, p)
        if len(prompts) == 0:
            return []
        if seeds is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63 - 1, size=len(prompts))]
        jobs = [self._generate_one(p, params, int(s) % 2**63, return_logprobs) for p, s in zip(prompts, seeds)]
        gens = self._run(self._gather(jobs))
        self.tokens_generated += sum(len(g.token_ids) for g in gens)
        return gens

    async def _generate_one(self, prompt: Prompt, params: SamplingParams, seed: int,
                            return_logprobs: bool) -> Generation:
        stop = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        ids = prompt_token_ids(self.tokenizer, prompt)
        body: dict[str, Any] = {"model": self.name, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "n": 1}

        def read(data: Any) -> Any:
            return read_generation(data, api=self.api, vocab_size=self.vocab_size, max_tokens=params.max_new_tokens,
                                   sent_ids=ids, want_logprobs=return_logprobs)

        if self.api == "chat":
            body["messages"] = [dict(m) for m in prompt]  # type: ignore[union-attr]
            answer = await self._request("POST", "/chat/completions", body, read)
            text = answer.text
            return Generation(text=text, token_ids=list(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                              finished=answer.finished, prompt_token_ids=ids)
        # vLLM extensions: stop ids, plain sampling (no server-side generation-config defaults), ids in and out.
        body.update(prompt=ids, stop_token_ids=stop, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    return_token_ids=True)
        if return_logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        answer = await self._request("POST", "/completions", body, read)
        toks = answer.token_ids
        kept = toks[:-1] if answer.finished and toks and toks[-1] in stop else toks
        return Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True), token_ids=toks,
                          logprobs=answer.logprobs, finished=answer.finished, prompt_token_ids=ids)

    # ---- next-token scoring (the LLM judge) ------------------------------------------------------------------

    def next_token_logprobs(self, prompts: Sequence[Prompt], candidate_ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``candidate_ids`` as the next token after each prompt, shape (B, K).

        ``api="completions"``: exact full-vocabulary log-probs (vLLM's ``logprob_token_ids``). ``api="chat"``:
        read from the top 20 log-probs of the first generated token; a candidate not among them is ``-inf``.
        """
        self._check_open()
        for i, p in enumerate(prompts):
            self._check_prompt(i, p)
        cands = [int(c) for c in candidate_ids]
        rows = self._run(self._gather([self._score_one(p, cands) for p in prompts]))
        out = np.asarray(rows, dtype=np.float64).reshape(len(prompts), len(cands))
        if self.api == "chat" and np.isinf(out).any() and not self._warned_missing:
            warnings.warn(f"some candidate tokens were not among the top {CHAT_TOP_LOGPROBS} log-probs of "
                          f"{self.base_url} (api='chat'); their probability is taken as 0", stacklevel=2)
            self._warned_missing = True
        return out

    async def _score_one(self, prompt: Prompt, cands: list[int]) -> list[float]:
        body: dict[str, Any] = {"model": self.name, "max_tokens": 1, "temperature": 0.0, "n": 1}
        texts = [self.tokenizer.decode([c]) for c in cands] if self.api == "chat" else []

        def read(data: Any) -> list[float]:
            return read_candidate_logprobs(data, api=self.api, candidates=cands, candidate_texts=texts,
                                           vocab_size=self.vocab_size)

        if self.api == "chat":
            body.update(messages=[dict(m) for m in prompt], logprobs=True,  # type: ignore[union-attr]
                        top_logprobs=CHAT_TOP_LOGPROBS)
            return await self._request("POST", "/chat/completions", body, read)
        body.update(prompt=prompt_token_ids(self.tokenizer, prompt), logprobs=1, logprob_token_ids=cands,
                    return_tokens_as_token_ids=True)
        return await self._request("POST", "/completions", body, read)

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, read: Callable[[Any], Any],
                       retries: int | None = None) -> Any:
        """One call with bounded retries; returns ``read(decoded JSON)`` or raises :class:`ServerError`.

        ``read`` checks the answer (:mod:`~dialogue_gym.generation.http_answers`); its :class:`AnswerError`
        becomes a ServerError here, not retried (a server that answers nonsense once will again)."""
        retries = self.max_retries if retries is None else retries
        last: _Retryable | None = None
        for attempt in range(retries + 1):
            if attempt:
                assert last is not None
                await asyncio.sleep(retry_wait(attempt, self.backoff_s, last.wait_s, random.random(),
                                               MAX_RETRY_AFTER_S))
            try:
                data = await self._attempt(method, path, body)
            except _Retryable as e:
                last = e
                continue
            try:
                return read(data)
            except AnswerError as e:
                raise self._error(f"{method} {self.base_url}{path}: unusable answer: {e}", 200) from None
        assert last is not None
        tries = f"{retries + 1} attempt{'s' if retries else ''}"
        raise self._error(f"{method} {self.base_url}{path} failed after {tries}: {last.what}", last.status,
                          body=last.body)

    async def _attempt(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """One HTTP request under one deadline (``timeout_s``) and the body-size cap; the decoded JSON."""
        import httpx

        async with self._sem:
            self.requests += 1
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with self._client.stream(method, self.base_url + path, json=body,
                                                   headers=self._headers()) as r:
                        content = await self._read_body(r, method, path)
            except (TimeoutError, httpx.TimeoutException):
                raise _Retryable(f"no answer within timeout_s={self.timeout_s:g} s") from None
            except httpx.TransportError as e:
                raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
        text = content.decode("utf-8", errors="replace")
        if r.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {r.status_code}", r.status_code, retry_after(r), body=text)
        if r.status_code == 401:
            hint = f"; set ${self.api_key_env}" if not os.environ.get(self.api_key_env) else ""
            raise self._error(f"{method} {self.base_url}{path}: HTTP 401 (unauthorised){hint}", 401)
        if r.status_code != 200:
            raise self._error(f"{method} {self.base_url}{path}: HTTP {r.status_code}", r.status_code, body=text)
        try:
            return json.loads(content)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays nested past the parser's depth
            raise self._error(f"{method} {self.base_url}{path}: malformed JSON in an HTTP 200 answer ({e})", 200,
                              body=text) from None

    async def _read_body(self, r: Any, method: str, path: str) -> bytes:
        """The whole body, refused (ServerError) as soon as it is known to pass ``max_body_bytes``: from its
        ``Content-Length`` before reading, else while streaming it."""
        too_big = (f"{method} {self.base_url}{path}: the answer is larger than "
                   f"max_body_bytes={self.max_body_bytes} bytes")
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._error(f"{too_big} (Content-Length {declared})", r.status_code)
        chunks, size = [], 0
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._error(f"{too_big} (stopped reading at {size})", r.status_code)
            chunks.append(chunk)
        return b"".join(chunks)

    def _error(self, what: str, status: int | None = None, body: str | None = None) -> ServerError:
        return server_error(what, self.base_url, self.name, status, body=body,
                            secrets=[os.environ.get(self.api_key_env)])

    # ---- plumbing --------------------------------------------------------------------------------------------

    def _check_prompt(self, index: int, prompt: Prompt) -> None:
        if isinstance(prompt, (str, bytes)):
            raise TypeError(f"prompt {index} is a string; give a chat conversation (list of messages) or a list "
                            "of token ids")
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; give at least one message or one token id")
        if self.api == "chat" and is_token_prompt(prompt):
            raise ValueError(f"prompt {index} is a token-id list; api='chat' takes chat conversations only")

    @staticmethod
    async def _gather(jobs: list[Any]) -> list[Any]:
        """All jobs concurrently; the first failure cancels the rest and is raised as is."""
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: the engine cannot send requests any more."""
        return not self._thread.is_alive()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this OpenAIEngine was closed; build a new one")

    def _run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Close the connections and stop the engine's event-loop thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

