"""Continuous batching: many requests on one text model, their steps in one forward pass.

A scheduler thread owns the model and lives as long as the generator (see `_serve`). Each step
feeds one token of every decoding request plus chunks of the newcomers' prompts, flattened into
one row of tokens (`layers.BatchStep`): decoding is memory-bound, so the weights stream once for all rows and eight requests cost little more than
one. Requests join and leave between steps; each keeps its own sampling settings, stop ids, seed
and cancellation, and a long prompt is prefilled a chunk per step, so it never stalls the others
for long and a cancelled request stops between chunks. A finished request leaves its keys/values
in its slot: a new request that starts with the same tokens (the next turn of a chat) reuses them
instead of prefilling them again.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .ernie4_5 import Ernie45ForCausalLM
from .compiled import decode_batch
from .generation import Sampler
from .layers import BatchStep, KVCache

_END = object()  # queued after a request's last token
MIN_CAPACITY = 256  # positions a slot's cache starts with; it doubles as needed


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: frozenset[int]
    cancel: threading.Event | None
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False  # the consumer went away
    slot: Slot | None = None
    prompt_done: int = 0  # prompt tokens whose keys/values are in the slot
    generated: int = 0
    pending: int | None = None  # the last sampled token, fed at the next step

    @property
    def abandoned(self) -> bool:
        return self.closed or (self.cancel is not None and self.cancel.is_set())


@dataclass
class Slot:
    """A KV cache that requests take turns on; `tokens` are those whose keys/values it holds."""

    cache: KVCache
    tokens: list[int] = field(default_factory=list)
    request: Request | None = None
    last_used: float = 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BatchGenerator:
    """Serves `generate` calls from any number of threads on one model, batching their steps.

    `slots` requests run at once (others wait for a slot); a step prefills at most
    `chunk_tokens` prompt tokens while other requests decode, `solo_chunk_tokens` when none does.
    Each slot's cache grows with its conversation, so memory follows the tokens held.

    One scheduler thread runs every step, for the generator's whole life: each thread that runs
    parallel torch work keeps an OpenMP pool while it lives, and two live pools on 2 cores make
    libgomp sleep between parallel regions instead of spinning, which halves the compiled step
    (BENCHMARKS.md, issue 9). A thread per busy period would leave such pools behind. The thread
    holds the generator only weakly while idle, so dropping the generator frees it (and its
    model); `close` ends it at once.
    """

    def __init__(self, model: Ernie45ForCausalLM, slots: int = 8, chunk_tokens: int = 128, solo_chunk_tokens: int = 512) -> None:
        self.model = model
        self.chunk_tokens, self.solo_chunk_tokens = chunk_tokens, solo_chunk_tokens
        self.slots: list[Slot] = []
        self.steps = 0  # forward passes run so far (for tests and statistics)
        self._waiting: list[Request] = []
        self._active: list[Request] = []
        self._wake = threading.Condition()
        self._closed = threading.Event()
        self._busy = False
        started = queue.SimpleQueue()  # the slots' caches are made on the scheduler thread (its pool)
        self._thread = threading.Thread(
            target=_serve, args=(weakref.ref(self), slots, started, self._wake, self._waiting, self._closed),
            name="batch-generator", daemon=True,
        )
        self._thread.start()
        if (error := started.get()) is not None:
            raise error
        _SCHEDULERS.difference_update([s for s in _SCHEDULERS if not s[0].is_alive()])  # ended ones
        _SCHEDULERS.add((self._thread, self._closed, self._wake))

    def generate(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        eos_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[int]:
        """Yield up to `max_new_tokens` new token ids, as `models.generate` does for one prompt
        alone (the same greedy tokens). Setting `cancel`, or closing the iterator, ends the
        request at the next step."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("generate needs at least one prompt token")
        if max_new_tokens <= 0:
            return
        config = self.model.config
        stop = frozenset(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        sampler = Sampler(ids.to(self.model.device), config.vocab_size, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        request = Request(ids.tolist(), max_new_tokens, sampler, stop, cancel)
        with self._wake:
            if self._closed.is_set():
                raise RuntimeError("this generator is closed")
            self._waiting.append(request)
            self._busy = True
            self._wake.notify()
        try:
            while (item := request.tokens.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.closed = True  # a consumer that went away frees its slot at the next step

    @property
    def kv_bytes(self) -> int:
        """Bytes the slots' caches hold: they grow with their conversations and keep them for reuse."""
        return sum(t.nbytes for slot in self.slots for t in (*slot.cache.keys, *slot.cache.values))

    @property
    def busy(self) -> bool:
        """Whether requests are waiting or running."""
        return self._busy

    def close(self) -> None:
        """End the scheduler thread after its current step; requests not finished get an error."""
        with self._wake:
            self._closed.set()
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _make_slots(self, count: int) -> None:
        with torch.inference_mode():  # as the compiled step's own caches (else it would recompile)
            self.slots = [Slot(self.model.new_cache(1, MIN_CAPACITY)) for _ in range(count)]

    def _serve_until_idle(self) -> None:
        """Run steps until no request is left (or the generator is closed)."""
        while True:
            with self._wake:
                for request in [r for r in self._waiting if r.abandoned or self._closed.is_set()]:
                    request.tokens.put(_END if request.abandoned else RuntimeError("the model was unloaded"))
                    self._waiting.remove(request)
                if self._closed.is_set():
                    for request in list(self._active):
                        self._finish(request, RuntimeError("the model was unloaded"))
                if not self._active and not self._waiting:
                    self._busy = False
                    return
                self._admit()
            try:
                self._step()
            except Exception as error:  # a failed step ends its requests, not the scheduler
                for request in list(self._active):
                    self._finish(request, error)

    def _admit(self) -> None:
        """Give waiting requests free slots, each the one holding the longest prefix of its
        prompt (else the least recently used)."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.request is None]
            if not free:
                return
            request = self._waiting.pop(0)
            # At least the last prompt token is fed again: its logits choose the first new token.
            reuse = [common_prefix(slot.tokens, request.ids[:-1]) for slot in free]
            best = max(range(len(free)), key=lambda i: (reuse[i], -free[i].last_used))
            slot = free[best]
            del slot.tokens[reuse[best]:]
            slot.request, request.slot, request.prompt_done = request, slot, reuse[best]
            self._active.append(request)

    @torch.inference_mode()
    def _step(self) -> None:
        for request in [r for r in self._active if r.abandoned]:
            self._finish(request)
        if not self._active:
            return
        decoding = [r for r in self._active if r.pending is not None]
        budget = self.chunk_tokens if decoding else self.solo_chunk_tokens
        chunks = []
        for request in (r for r in self._active if r.pending is None):
            n = min(budget, len(request.ids) - request.prompt_done)
            if n <= 0:
                break
            chunks.append((request, request.prompt_done, n))
            budget -= n
        ids = [r.pending for r in decoding] + [t for r, begin, n in chunks for t in r.ids[begin : begin + n]]
        segments = [(r.slot.cache, len(r.slot.tokens), 1) for r in decoding] + [(r.slot.cache, begin, n) for r, begin, n in chunks]
        for cache, begin, n in segments:
            cache.reserve(begin + n)
        step = BatchStep(segments)
        sampling = list(decoding)
        rows = list(range(len(decoding)))
        offset = len(decoding)
        for request, begin, n in chunks:
            offset += n
            if begin + n == len(request.ids):  # the prompt is complete: sample its first token
                sampling.append(request)
                rows.append(offset - 1)
        ids = torch.tensor(ids, device=self.model.device)
        if not chunks:  # the compiled steps, when ready
            logits = decode_batch(self.model, step, ids)[0]
        else:  # prompt chunks: eager is faster for them
            logits = self.model.forward_step(step, ids, rows)[0]
        self.steps += 1
        for request in decoding:
            request.slot.tokens.append(request.pending)
        for request, begin, n in chunks:
            request.slot.tokens.extend(request.ids[begin : begin + n])
            request.prompt_done = begin + n
        if not sampling:
            return
        tokens = torch.stack([r.sampler(logits[i]) for i, r in enumerate(sampling)]).tolist()  # one host sync
        for request, token in zip(sampling, tokens):
            request.generated += 1
            request.tokens.put(token)
            if token in request.stop_ids or request.generated == request.max_new_tokens:
                self._finish(request)
            else:
                request.pending = token

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        request.tokens.put(_END if error is None else error)
        slot = request.slot
        slot.request, slot.last_used = None, time.monotonic()
        self._active.remove(request)


_SCHEDULERS: set[tuple[threading.Thread, threading.Event, threading.Condition]] = set()


def _serve(generator_ref: weakref.ref, slots: int, started: queue.SimpleQueue, wake: threading.Condition,
           waiting: list[Request], closed: threading.Event) -> None:
    """The scheduler thread: make the slots, then serve each busy period. While idle it holds
    only what it waits on, not the generator, and looks every second whether it is gone."""
    try:
        generator_ref()._make_slots(slots)
    except BaseException as error:
        started.put(error)
        return
    started.put(None)
    while not closed.is_set():
        with wake:
            wake.wait_for(lambda: waiting or closed.is_set(), timeout=1.0)
        generator = generator_ref()
        if generator is None:
            return
        generator._serve_until_idle()
        del generator


@atexit.register
def _stop_schedulers() -> None:
    """A daemon thread still alive at interpreter exit can abort the process ("terminate called
    without an active exception"): let each scheduler, even of a generator already dropped,
    finish its step and end first."""
    for thread, closed, wake in list(_SCHEDULERS):
        with wake:
            closed.set()
            wake.notify_all()
        thread.join()
