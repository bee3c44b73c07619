"""The local transformers Engine: continuous batching of concurrent generate() calls on one model.

Every episode of a GRPO step calls ``generate`` concurrently. A single worker coroutine owns the batch:
at each step it prefills the requests that arrived since the last step (left-padded, in one forward),
merges their KV cache into the running batch, decodes one token for every running sequence in one
forward, and retires the sequences that stopped. The forward runs in a worker thread so the event loop
(sandbox calls, other episodes) keeps moving. The KV cache lives in preallocated buffers that grow by
doubling, so a decode step writes one column instead of copying the whole cache.

Log-probabilities are those of the sampling distribution at temperature T before top-k/top-p
filtering: ``log_softmax(logits / T)``, exactly what the GRPO trainer recomputes with a full forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

try:  # the shared protocol types (rollout helper); identical fallbacks until they land
    from retool.engines.base import Generation, SamplingParams
except ImportError:  # pragma: no cover - only before retool/engines/base.py exists

    @dataclass
    class SamplingParams:  # type: ignore[no-redef]
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = -1
        max_new_tokens: int = 512
        stop: list[str] = field(default_factory=list)
        stop_token_ids: list[int] = field(default_factory=list)

    @dataclass
    class Generation:  # type: ignore[no-redef]
        token_ids: list[int]
        logprobs: list[float]
        finish_reason: str
        text: str = ""


__all__ = ["LocalEngine", "SamplingParams", "Generation"]


class _BufferLayer(DynamicLayer):
    """A KV layer over preallocated [B, H, capacity, D] buffers; appending writes in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.is_initialized = True
        self.device = keys.device
        self._views()

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.length + key_states.shape[-2]
        if need > self.kbuf.shape[2]:
            cap = need + _GROW  # linear growth: a copy every _GROW tokens, memory stays near the need
            self.kbuf = _grow(self.kbuf, cap)
            self.vbuf = _grow(self.vbuf, cap)
        self.kbuf[:, :, self.length : need] = key_states
        self.vbuf[:, :, self.length : need] = value_states
        self.length = need
        self._views()
        return self.kbuf[:, :, :need], self.vbuf[:, :, :need]

    def get_seq_length(self) -> int:
        return self.length


_GROW = 96


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise; RSS would only grow)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _grow(buf: torch.Tensor, cap: int) -> torch.Tensor:
    out = buf.new_zeros(buf.shape[0], buf.shape[1], cap, buf.shape[3])
    out[:, :, : buf.shape[2]] = buf
    return out


@dataclass
class _Request:
    input_ids: list[int]
    params: Any
    future: asyncio.Future[Any]
    stop_ids: set[int] = field(default_factory=set)
    out_ids: list[int] = field(default_factory=list)
    out_lps: list[float] = field(default_factory=list)
    tail: str = ""
    pos: int = 0  # position id of the pending token
    finish: str | None = None


class LocalEngine:
    """Engine protocol over an in-process transformers causal LM (CPU or CUDA)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 256,
        batch_wait_ms: float = 2.0,
        seed: int = 0,
        stop_on_eos: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_ids: set[int] = set()
        if stop_on_eos and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        vocab = len(tokenizer)
        # per-token text for stop-string checks (decoded whole at the end for Generation.text)
        self._piece = [tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab)]
        self._max_piece = max((len(p) for p in self._piece), default=1)
        self._pending: list[_Request] = []
        self._running: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # the model is used by one thread at a time
        # batch state
        self._layers: list[_BufferLayer] = []
        self._mask: torch.Tensor | None = None  # [B, L] 1 for real tokens
        # transformers renamed past_key_values to cache (5.2x); use whichever this version takes
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forwards = 0  # counters, for tests and benchmarks
        self.decode_steps = 0

    # ---------------------------------------------------------------- protocol
    async def generate(self, input_ids: list[int], params: Any) -> Generation:
        if not input_ids:
            raise ValueError("generate() needs at least one input token")
        if len(input_ids) >= self.max_positions:
            return Generation(token_ids=[], logprobs=[], finish_reason="length", text="")
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        req = _Request(list(input_ids), params, loop.create_future())
        req.stop_ids = set(int(t) for t in (params.stop_token_ids or [])) | self.eos_ids
        self._pending.append(req)
        assert self._wake is not None
        self._wake.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            req.finish = "abort"
            raise

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        self._worker = None

    # ---------------------------------------------------------------- worker
    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending and not self._running:
                self._wake.clear()
                await self._wake.wait()
                if self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s)  # let a burst of episodes arrive together
            room = self.max_batch_size - len(self._running)
            admit = [r for r in self._pending[:room] if r.finish is None]
            self._pending = self._pending[room:] if room > 0 else self._pending
            try:
                done = await asyncio.to_thread(self._step, admit)
            except BaseException as exc:  # fail every waiter rather than hang them
                for r in self._running + admit + self._pending:
                    if not r.future.done():
                        r.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                self._running, self._pending, self._layers, self._mask = [], [], [], None
                if not isinstance(exc, Exception):
                    raise
                continue
            for r in done:
                if not r.future.done():
                    text = self.tokenizer.decode(r.out_ids, skip_special_tokens=False)
                    r.future.set_result(
                        Generation(
                            token_ids=r.out_ids,
                            logprobs=r.out_lps,
                            finish_reason=r.finish or "stop",  # type: ignore[arg-type]
                            text=text,
                        )
                    )
            await asyncio.sleep(0)

    def _step(self, admit: list[_Request]) -> list[_Request]:
        with self._lock, torch.inference_mode():
            done: list[_Request] = []
            if self._running:
                logits = self._decode()
                done += self._sample(self._running, logits)
            if admit:
                logits, layers, mask = self._prefill(admit)
                done += self._sample(admit, logits)
                self._merge(admit, layers, mask)
            aborted = [r for r in self._running if r.finish == "abort"]
            done += aborted
            self._retire()
            return done

    def _prefill(self, reqs: list[_Request]) -> tuple[torch.Tensor, list[_BufferLayer], torch.Tensor]:
        longest = max(len(r.input_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), longest), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.input_ids)
            ids[i, longest - n :] = torch.tensor(r.input_ids)
            mask[i, longest - n :] = 1
            r.pos = n
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cfg = self.model.config
        n_kv = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        cap = longest + _GROW
        layers = [
            _BufferLayer(
                torch.zeros(len(reqs), n_kv, cap, head_dim, dtype=dtype, device=self.device),
                torch.zeros(len(reqs), n_kv, cap, head_dim, dtype=dtype, device=self.device),
                0,
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            **{self._cache_kw: Cache(layers=layers)},  # type: ignore[arg-type]
            use_cache=True,
        )
        self.forwards += 1
        keep = mask.bool()[:, None, :, None]
        for layer in layers:  # padded rows may hold garbage; zero them so 0-weight never meets NaN
            layer.kbuf[:, :, :longest].masked_fill_(~keep, 0.0)
            layer.vbuf[:, :, :longest].masked_fill_(~keep, 0.0)
        return out.logits[:, -1, :].float(), layers, mask

    def _decode(self) -> torch.Tensor:
        assert self._mask is not None
        ids = torch.tensor([[r.out_ids[-1]] for r in self._running], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.pos] for r in self._running], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: Cache(layers=self._layers)},  # type: ignore[arg-type]
        )
        self.forwards += 1
        self.decode_steps += 1
        for r in self._running:
            r.pos += 1
        return out.logits[:, -1, :].float()

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[_Request]:
        temps = torch.tensor([float(r.params.temperature) for r in reqs], device=logits.device)
        greedy = temps <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        choice = logp.argmax(dim=-1)
        if not bool(greedy.all()):
            probs = logp.exp()
            for i, r in enumerate(reqs):
                if greedy[i]:
                    continue
                top_k, top_p = int(r.params.top_k or -1), float(r.params.top_p or 1.0)
                if top_k > 0 or top_p < 1.0:
                    probs[i] = _filter(probs[i], top_k, top_p)
            sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            choice = torch.where(greedy, choice, sampled)
        chosen_lp = logp.gather(-1, choice[:, None]).squeeze(-1).tolist()
        done: list[_Request] = []
        for r, tok, lp in zip(reqs, choice.tolist(), chosen_lp, strict=True):
            if r.finish == "abort":
                continue
            r.out_ids.append(tok)
            r.out_lps.append(lp)
            r.tail = (r.tail + self._piece[tok])[-(self._max_piece + 64) :]
            stops = r.params.stop or []
            if tok in r.stop_ids or any(s and s in r.tail for s in stops):
                r.finish = "stop"
            elif len(r.out_ids) >= r.params.max_new_tokens or r.pos + 1 >= self.max_positions:
                r.finish = "length"
            if r.finish is not None:
                done.append(r)
            if r.finish == "stop" and stops:
                r.tail = ""
        return done

    def _merge(self, reqs: list[_Request], layers: list[_BufferLayer], mask: torch.Tensor) -> None:
        if not self._running:
            self._running, self._layers, self._mask = list(reqs), layers, mask
            return
        assert self._mask is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        cap = length + _GROW
        merged = []
        for old, new in zip(self._layers, layers, strict=True):
            bufs = []
            for ob, nb in ((old.kbuf, new.kbuf), (old.vbuf, new.vbuf)):
                out = ob.new_zeros(ob.shape[0] + nb.shape[0], ob.shape[1], cap, ob.shape[3])
                out[: ob.shape[0], :, length - old_len : length] = ob[:, :, :old_len]
                out[ob.shape[0] :, :, length - new_len : length] = nb[:, :, :new_len]
                bufs.append(out)
            merged.append(_BufferLayer(bufs[0], bufs[1], length))
        m = self._mask.new_zeros(self._mask.shape[0] + mask.shape[0], length)
        m[: self._mask.shape[0], length - old_len :] = self._mask
        m[self._mask.shape[0] :, length - new_len :] = mask
        self._layers, self._mask = merged, m
        self._running = self._running + list(reqs)

    def _retire(self) -> None:
        """Drop finished rows and the left columns that are padding for every remaining row."""
        keep = [i for i, r in enumerate(self._running) if r.finish is None]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._layers, self._mask = [], [], None
            trim_heap()
            return
        assert self._mask is not None
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        first = int((mask.sum(0) > 0).nonzero()[0].item())
        mask = mask[:, first:]
        length = mask.shape[1]
        layers = []
        for layer in self._layers:
            k = layer.kbuf.index_select(0, idx)[:, :, first:]
            v = layer.vbuf.index_select(0, idx)[:, :, first:]
            layers.append(_BufferLayer(k.contiguous(), v.contiguous(), length))
        self._running = [self._running[i] for i in keep]
        self._layers, self._mask = layers, mask


def _filter(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the tail of one row's distribution for top-k / top-p sampling (logprobs stay unfiltered)."""
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1.0:
        cum = sorted_p.cumsum(0)
        keep &= (cum - sorted_p) < top_p
    keep[0] = True
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()
