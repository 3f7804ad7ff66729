"""Which sequences go into the next micro-batch of a serving pipeline (pure Python, no torch).

The scheduler on rank 0 (chipfuse.serve.worker) asks `Batcher.next_batch()` for micro-batches until it
says none, sends each down the pipeline, and hands the tokens that come back to `Batcher.complete()`.

Policy (chunked prefill, as vLLM's chunked prefill and Sarathi-Serve do it):
- Requests are admitted in arrival order while fewer than `max_seqs` hold a KV cache.
- At most one micro-batch per stage is in flight: more would only queue in front of a busy stage.
- Decoding sequences (prompt fully cached) form the plan's `groups` groups of ceil(decoding / groups)
  sequences; a group that is back is sent again at once, one token per sequence. Decode is never held
  back for a prefill: it rides in the same micro-batch.
- Prompts are prefilled in chunks: each micro-batch carries at most `prefill_tokens` prompt tokens, taken
  from the waiting prompts in arrival order. A long prompt therefore takes several micro-batches (its
  chunks follow one another down the pipeline, so the stages work on them at once) while the requests
  already decoding keep getting a token per round; a prompt that arrives behind it waits for at most
  the chunks ahead of it, never for whole prompts to finish. Only the chunk that ends a prompt samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Event = tuple  # ("token", req_id, token) | ("done", req_id, reason)


@dataclass(kw_only=True)
class Seq:
    req_id: str
    tokens: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    prompt_len: int = 0
    """Tokens to prefill (set on add: the prompt, plus any tokens a resubmitted request already has)."""
    sent: int = 0
    """Positions sent into the pipeline."""
    generated: int = 0
    in_flight: int = 0
    """Micro-batches holding a part of this sequence (a long prompt's chunks can follow each other)."""
    cancelled: bool = False

    @property
    def decoding(self) -> bool:
        return self.sent >= self.prompt_len


@dataclass(frozen=True, kw_only=True)
class Part:
    """One sequence's share of a micro-batch: tokens [start, start + n) of it."""

    sid: int
    start: int
    n: int
    sample: bool
    """The last stage samples a token (decode, or the chunk that ends the prompt)."""
    decode: bool
    """One generated token fed back (not a prompt chunk)."""


class Batcher:
    def __init__(self, *, max_seqs: int, groups: int, stages: int, prefill_tokens: int, context_len: int):
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens is {prefill_tokens}; use at least 1")
        self.max_seqs, self.groups, self.stages = max_seqs, max(1, groups), stages
        self.prefill_tokens, self.context_len = prefill_tokens, context_len
        self.seqs: dict[int, Seq] = {}
        self.waiting: list[int] = []  # admitted once a slot frees (the KV caches are sized for max_seqs)
        self.by_req: dict[str, int] = {}
        self.in_flight: list[list[Part]] = []
        self.releases: list[int] = []
        """Sequences whose KV caches every stage frees (sent with the next micro-batch)."""
        self._next_id = 0

    # ---------------------------------------------------------------- requests
    def add(self, seq: Seq) -> int:
        sid = self._next_id
        self._next_id += 1
        seq.prompt_len = len(seq.tokens)
        self.seqs[sid] = seq
        self.by_req[seq.req_id] = sid
        self.waiting.append(sid)
        return sid

    def cancel(self, req_id: str) -> list[Event]:
        sid = self.by_req.get(req_id)
        if sid is None or sid not in self.seqs:
            return []
        self.seqs[sid].cancelled = True
        return [] if self.seqs[sid].in_flight else self._finish(sid, "cancelled")

    def _finish(self, sid: int, reason: str) -> list[Event]:
        s = self.seqs.pop(sid)
        self.by_req.pop(s.req_id, None)
        if sid in self.waiting:
            self.waiting.remove(sid)
        elif s.sent:
            self.releases.append(sid)
        return [("done", s.req_id, reason)]

    def active(self) -> list[int]:
        return [sid for sid in self.seqs if sid not in self.waiting]

    def has_work(self) -> bool:
        return bool(self.in_flight or self.waiting or any(not s.in_flight for s in self.seqs.values()))

    # ---------------------------------------------------------------- the policy
    def next_batch(self) -> list[Part] | None:
        """The next micro-batch to send (marked as sent), or None when none should go now."""
        while self.waiting and len(self.active()) < self.max_seqs:
            self.waiting.pop(0)
        if len(self.in_flight) >= self.stages:
            return None
        act = [sid for sid in self.active() if not self.seqs[sid].cancelled]
        decoding = [sid for sid in act if self.seqs[sid].decoding]
        parts: list[Part] = []
        decode_groups = sum(1 for b in self.in_flight if any(p.decode for p in b))
        ready = [sid for sid in decoding if not self.seqs[sid].in_flight]
        if ready and decode_groups < self.groups:
            size = math.ceil(len(decoding) / min(len(decoding), self.groups))
            parts = [Part(sid=sid, start=self.seqs[sid].sent, n=1, sample=True, decode=True) for sid in ready[:size]]
        budget = self.prefill_tokens
        for sid in act:
            s = self.seqs[sid]
            if budget <= 0:
                break
            if s.decoding:
                continue
            n = min(s.prompt_len - s.sent, budget)
            parts.append(Part(sid=sid, start=s.sent, n=n, sample=s.sent + n == s.prompt_len, decode=False))
            budget -= n
        if not parts:
            return None
        for p in parts:
            s = self.seqs[p.sid]
            s.sent = p.start + p.n
            s.in_flight += 1
        self.in_flight.append(parts)
        return parts

    def complete(self, tokens: list[int]) -> list[Event]:
        """The oldest micro-batch is back with one token per part (ignored where the part does not sample)."""
        batch = self.in_flight.pop(0)
        events: list[Event] = []
        for p, tok in zip(batch, tokens, strict=True):
            s = self.seqs[p.sid]
            s.in_flight -= 1
            if s.cancelled:
                if not s.in_flight:
                    events += self._finish(p.sid, "cancelled")
                continue
            if not p.sample:
                continue
            s.tokens.append(tok)
            s.generated += 1
            events.append(("token", s.req_id, tok))
            if tok in s.stop_ids:
                events += self._finish(p.sid, "stop")
            elif s.generated >= s.max_new:
                events += self._finish(p.sid, "length")
            elif len(s.tokens) >= self.context_len:
                events += self._finish(p.sid, "context")
        return events
