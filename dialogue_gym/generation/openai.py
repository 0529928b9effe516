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

Faults. Timeouts, refused or dropped connections and HTTP 429/500/502/503/504 are retried ``max_retries`` times
with exponential backoff (or the server's ``Retry-After``, capped); then, like any other HTTP error or a
malformed answer (bad JSON, wrong number of choices, missing fields), a :class:`ServerError` names the server,
the model and the status. A batch fails as a whole (no partial results), and the env steps copies of its
states, so a failed step leaves every episode as it was.

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
from collections.abc import Sequence
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
from dialogue_gym.generation.http_common import ServerError, check_base_url, retry_after, snippet, tokenizer_for

APIS = ("completions", "chat")
RETRY_STATUSES = (429, 500, 502, 503, 504)
CHAT_TOP_LOGPROBS = 20  # the most OpenAI's chat API (and vLLM's default max_logprobs) allows
MAX_RETRY_AFTER_S = 30.0


class _Retryable(Exception):
    def __init__(self, what: str, status: int | None = None, wait_s: float | None = None):
        super().__init__(what)
        self.what, self.status, self.wait_s = what, status, wait_s


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
        timeout_s: per-request timeout in seconds (connect, read and write).
        max_retries: retries after the first attempt for timeouts, connection errors and 429/5xx answers.
        backoff_s: wait before the first retry; doubled after every retry.
        seed: seeds the stream that gives seeds to rows that come without one.
        check: ask ``GET /models`` now and fail fast when the server is down or does not serve ``model``.

    Raises:
        ValueError: a bad setting (named).
        ServerError: ``check`` and the server is unreachable or does not serve ``model``.
    """

    token_prompts = True  # judges may pass token-id prompts (False for api="chat")

    def __init__(self, model: str, base_url: str, *, api: str = "completions", api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 32, timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 0.5,
                 seed: int = 0, check: bool = True):
        import httpx

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be the served model name, got {model!r}")
        self.base_url = check_base_url(base_url)
        if api not in APIS:
            raise ValueError(f"api is {api!r}; allowed: {', '.join(APIS)}")
        if not isinstance(api_key_env, str) or not api_key_env.strip():
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        for name, value, low in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0)):
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
        self.tokenizer = tokenizer_for(model)
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
        data = self._run(self._request("GET", "/models", None, retries=0))
        try:
            served = [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as e:
            raise self._error(f"GET {self.base_url}/models answered without a model list ({e!r})") from None
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
        if self.api == "chat":
            body["messages"] = [dict(m) for m in prompt]  # type: ignore[union-attr]
            choice = self._one_choice(await self._request("POST", "/chat/completions", body))
            text = _field(choice, ("message", "content"), self)
            if not isinstance(text, str):
                raise self._error(f"chat choice has message.content of type {type(text).__name__}, not a string")
            return Generation(text=text, token_ids=list(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                              finished=choice.get("finish_reason") == "stop", prompt_token_ids=ids)
        # vLLM extensions: stop ids, plain sampling (no server-side generation-config defaults), ids in and out.
        body.update(prompt=ids, stop_token_ids=stop, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    return_token_ids=True)
        if return_logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        choice = self._one_choice(await self._request("POST", "/completions", body))
        toks = _int_list(_field(choice, ("token_ids",), self, hint="token_ids is returned by vLLM's server "
                                         "(return_token_ids); for other servers use api='chat'"), "token_ids", self)
        seen = choice.get("prompt_token_ids")
        if seen is not None and list(seen) != ids:
            raise self._error(f"the server used {len(seen)} prompt token ids that differ from the {len(ids)} sent")
        finished = choice.get("finish_reason") == "stop"
        kept = toks[:-1] if finished and toks and toks[-1] in stop else toks
        logprobs = None
        if return_logprobs:
            tokens = _field(choice, ("logprobs", "tokens"), self)
            values = _field(choice, ("logprobs", "token_logprobs"), self)
            if not isinstance(tokens, list) or not isinstance(values, list) or \
                    [_token_id(t, self) for t in tokens] != toks or len(values) != len(toks):
                raise self._error("the log-probs do not match the returned token ids")
            logprobs = [float(v) for v in values]
        return Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True), token_ids=toks,
                          logprobs=logprobs, finished=finished, prompt_token_ids=ids)

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
        if self.api == "chat":
            body.update(messages=[dict(m) for m in prompt], logprobs=True,  # type: ignore[union-attr]
                        top_logprobs=CHAT_TOP_LOGPROBS)
            choice = self._one_choice(await self._request("POST", "/chat/completions", body))
            content = _field(choice, ("logprobs", "content"), self)
            if not isinstance(content, list) or not content:
                raise self._error("the chat answer has no log-probs for its first token")
            top = {str(e["token"]): float(e["logprob"]) for e in content[0].get("top_logprobs") or []}
            texts = [self.tokenizer.decode([c]) for c in cands]
            return [top.get(t, -np.inf) for t in texts]
        body.update(prompt=prompt_token_ids(self.tokenizer, prompt), logprobs=1, logprob_token_ids=cands,
                    return_tokens_as_token_ids=True)
        choice = self._one_choice(await self._request("POST", "/completions", body))
        top = _field(choice, ("logprobs", "top_logprobs"), self)
        if not isinstance(top, list) or not top or not isinstance(top[0], dict):
            raise self._error("the completion has no top log-probs for its first token")
        got = {_token_id(k, self): float(v) for k, v in top[0].items()}
        missing = [c for c in cands if c not in got]
        if missing:
            raise self._error(f"the server returned no log-prob for token ids {missing}: it ignored "
                              "logprob_token_ids (a vLLM extension); for other servers use api='chat'")
        return [got[c] if got[c] > -9999.0 else -np.inf for c in cands]  # vLLM sends -inf as -9999

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, retries: int | None = None) -> Any:
        """One call with bounded retries; returns the decoded JSON or raises :class:`ServerError`."""
        retries = self.max_retries if retries is None else retries
        last: _Retryable | None = None
        for attempt in range(retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                if last is not None and last.wait_s is not None:
                    wait = min(max(wait, last.wait_s), MAX_RETRY_AFTER_S)
                await asyncio.sleep(wait * (1 + 0.1 * random.random()))
            try:
                return await self._attempt(method, path, body)
            except _Retryable as e:
                last = e
        assert last is not None
        tries = f"{retries + 1} attempt{'s' if retries else ''}"
        raise self._error(f"{method} {self.base_url}{path} failed after {tries}: {last.what}", last.status)

    async def _attempt(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        import httpx

        async with self._sem:
            self.requests += 1
            try:
                r = await self._client.request(method, self.base_url + path, json=body, headers=self._headers())
            except httpx.TimeoutException:
                raise _Retryable(f"no answer within timeout_s={self.timeout_s:g} s") from None
            except httpx.TransportError as e:
                raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
        if r.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {r.status_code}: {snippet(r.text)}", r.status_code, retry_after(r))
        if r.status_code == 401:
            hint = f"; set ${self.api_key_env}" if not os.environ.get(self.api_key_env) else ""
            raise self._error(f"{method} {self.base_url}{path}: HTTP 401 (unauthorised){hint}", 401)
        if r.status_code != 200:
            raise self._error(f"{method} {self.base_url}{path}: HTTP {r.status_code}: {snippet(r.text)}",
                              r.status_code)
        try:
            return json.loads(r.content)
        except ValueError as e:
            raise self._error(f"{method} {self.base_url}{path}: malformed JSON in an HTTP 200 answer ({e}): "
                              f"{snippet(r.text)}", 200) from None

    def _one_choice(self, data: Any) -> dict[str, Any]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            n = len(choices) if isinstance(choices, list) else "no"
            raise self._error(f"the answer has {n} choices; one was asked for (n=1)")
        return choices[0]

    def _error(self, what: str, status: int | None = None) -> ServerError:
        where = f"server {self.base_url}, model {self.name!r}" + (f", HTTP status {status}" if status else "")
        return ServerError(f"{what} [{where}]", self.base_url, self.name, status)

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

    def _check_open(self) -> None:
        if not self._thread.is_alive():
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


def _field(data: dict[str, Any], path: tuple[str, ...], engine: OpenAIEngine, hint: str = "") -> Any:
    cur: Any = data
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            raise engine._error(f"the answer lacks {'.'.join(path)}" + (f" ({hint})" if hint else ""))
        cur = cur[key]
    return cur


def _int_list(value: Any, name: str, engine: OpenAIEngine) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise engine._error(f"{name} is not a list of integers")
    return list(value)


def _token_id(token: Any, engine: OpenAIEngine) -> int:
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].lstrip("-").isdigit():
        return int(token[9:])
    raise engine._error(f"token {token!r} is not a 'token_id:N' string (return_tokens_as_token_ids)")
