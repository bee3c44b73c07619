"""SGLang's native ``/generate`` over HTTP, called the way slime's rollout workers call it.

Request: ``{"input_ids": [...], "sampling_params": {...}, "return_logprob": true}``. Response:
``meta_info.output_token_logprobs`` is a list of ``[logprob, token_id, text_or_null]`` for every generated
token and ``meta_info.finish_reason.type`` is ``stop`` | ``length`` | ``abort``. The generated ids are taken
from ``output_token_logprobs`` (``output_ids`` when present must agree), so ids and logprobs always line up.
Transport failures (refused connection, timeouts, 429/5xx) are retried with backoff a bounded number of
times; anything else is an EngineError that says what the server returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from retool.engines.base import EngineError, Generation, SamplingParams, retry_async
from retool.prompts import decode_ids

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def sglang_payload(
    input_ids: list[int], params: SamplingParams, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The /generate request body for one call."""
    sampling: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "no_stop_trim": True,  # keep the stop string's tokens: ids are the ground truth
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if params.stop:
        sampling["stop"] = list(params.stop)
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if extra:
        sampling.update(extra)
    return {"input_ids": list(input_ids), "sampling_params": sampling, "return_logprob": True}


def parse_sglang_response(body: Any) -> Generation:
    """A Generation from a /generate response body; EngineError (not retryable) when it is malformed."""
    if isinstance(body, list):  # batch form: one request gives a one-element list
        if len(body) != 1:
            raise EngineError(f"expected one /generate result, got {len(body)}", retryable=False)
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise EngineError(f"/generate response has no meta_info: {str(body)[:200]}", retryable=False)
    meta = body["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length", "abort"):
        raise EngineError(f"/generate returned an unknown finish_reason {finish!r}", retryable=False)
    entries = meta.get("output_token_logprobs")
    if entries is None:
        if kind == "abort":
            return Generation([], [], "abort", "")
        raise EngineError(
            "/generate response lacks meta_info.output_token_logprobs (return_logprob?)", retryable=False
        )
    try:
        logprobs = [float(e[0]) if e[0] is not None else 0.0 for e in entries]
        token_ids = [int(e[1]) for e in entries]
    except (TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"malformed output_token_logprobs: {exc}", retryable=False) from exc
    output_ids = body.get("output_ids")
    if isinstance(output_ids, list) and output_ids and list(map(int, output_ids)) != token_ids:
        raise EngineError("output_ids and output_token_logprobs disagree", retryable=False)
    return Generation(token_ids, logprobs, kind, "")


class SGLangEngine:
    """Engine over an SGLang server or router. One aiohttp session per event loop; concurrent calls
    share its connection pool (the server batches them)."""

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        *,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_connections: int = 1024,
        extra_sampling_params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SGLang url must start with http:// or https://, got {url!r}")
        self.url = url if url.rstrip("/").endswith("/generate") else url.rstrip("/") + "/generate"
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_connections = max_connections
        self.extra_sampling_params = dict(extra_sampling_params or {})
        self.headers = dict(headers or {})
        self._sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        entry = self._sessions.get(id(loop))
        if entry is None or entry[0] is not loop or entry[1].closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, force_close=False)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                json_serialize=json.dumps,
            )
            self._sessions[id(loop)] = (loop, session)
            return session
        return entry[1]

    async def _post_once(self, payload: dict[str, Any]) -> Any:
        session = self._session()
        try:
            async with session.post(self.url, json=payload, headers=self.headers or None) as resp:
                text = await resp.text()
                if resp.status in _RETRY_STATUS:
                    raise EngineError(
                        f"SGLang {self.url} answered {resp.status}: {text[:200]}", retryable=True
                    )
                if resp.status != 200:
                    raise EngineError(
                        f"SGLang {self.url} answered {resp.status}: {text[:200]}", retryable=False
                    )
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise EngineError(
                f"SGLang {self.url} unreachable: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(
                f"SGLang {self.url} returned invalid JSON: {text[:200]}", retryable=False
            ) from exc

    async def generate(self, input_ids: list[int], params: SamplingParams) -> Generation:
        if params.max_new_tokens == 0:
            return Generation([], [], "length", "")
        payload = sglang_payload(input_ids, params, self.extra_sampling_params)
        body = await retry_async(
            lambda: self._post_once(payload),
            attempts=self.max_retries + 1,
            base_delay_s=self.backoff_s,
            max_delay_s=self.backoff_max_s,
            what=f"POST {self.url}",
        )
        gen = parse_sglang_response(body)
        if gen.token_ids:
            gen.text = decode_ids(self.tokenizer, gen.token_ids)
        return gen

    async def aclose(self) -> None:
        """Close the session of the running loop (others are dropped)."""
        loop = asyncio.get_running_loop()
        entry = self._sessions.pop(id(loop), None)
        if entry is not None and not entry[1].closed:
            await entry[1].close()
