"""The serving scheduler's policy (chipfuse.serve.batching), without processes: chunked prefill keeps
decode going while a long prompt is prefilled, a new request's first token comes within a bounded number
of pipeline rounds, and whatever the arrivals every prompt position is sent once, in order."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from chipfuse.serve.batching import Batcher, Part, Seq


def _step(b: Batcher, sent: list[list[Part]]) -> list[tuple]:
    """One pipeline round: send what the policy allows, then the oldest micro-batch comes back."""
    while (parts := b.next_batch()) is not None:
        sent.append(parts)
    if not b.in_flight:
        return []
    return b.complete([7 for _ in b.in_flight[0]])


def test_decode_continues_while_a_long_prompt_is_prefilled_and_its_first_token_is_bounded():
    b = Batcher(max_seqs=4, groups=1, stages=2, prefill_tokens=16, context_len=512)
    sent: list[list[Part]] = []
    for r in ("a", "b"):
        b.add(Seq(req_id=r, tokens=[1, 2, 3], max_new=100))
    for _ in range(4):
        _step(b, sent)
    b.add(Seq(req_id="long", tokens=list(range(100)), max_new=5))
    b.add(Seq(req_id="short", tokens=[4, 5], max_new=5))  # arrives right behind the long prompt
    rounds: dict[str, int] = {}
    decoded = {"a": 0, "b": 0}
    for step in range(1, 30):
        for ev in _step(b, sent):
            if ev[0] == "token":
                rounds.setdefault(ev[1], step)
                if ev[1] in decoded and "long" not in rounds:
                    decoded[ev[1]] += 1
    chunks = math.ceil(102 / 16)
    # The long prompt takes `chunks` micro-batches; meanwhile the running requests get a token on every trip
    # around the 2 stages, i.e. every 2 rounds (prefilled whole in one micro-batch, it left them at most 1).
    assert decoded["a"] >= rounds["long"] // 2 - 1 and decoded["a"] >= 3 and decoded["b"] == decoded["a"], decoded
    # A request's first token: after the prompt tokens ahead of it, at <= 16 per micro-batch, and the trip.
    assert rounds["long"] <= chunks + 2 and rounds["short"] <= chunks + 2, rounds
    assert all(sum(p.n for p in parts if not p.decode) <= 16 for parts in sent)
    assert all(len({p.sid for p in parts}) == len(parts) for parts in sent)


def test_requests_arriving_together_are_prefilled_together_and_only_the_last_chunk_samples():
    b = Batcher(max_seqs=8, groups=1, stages=2, prefill_tokens=512, context_len=128)
    for i in range(8):
        b.add(Seq(req_id=f"r{i}", tokens=[1] * 8, max_new=2))
    first = b.next_batch()
    assert first is not None and len(first) == 8 and all(p.sample and not p.decode for p in first)
    b2 = Batcher(max_seqs=1, groups=1, stages=3, prefill_tokens=4, context_len=128)
    b2.add(Seq(req_id="x", tokens=list(range(10)), max_new=1))
    chunks = [b2.next_batch() for _ in range(3)]  # one micro-batch per stage: the chunks follow each other
    assert [(c[0].start, c[0].n, c[0].sample) for c in chunks if c] == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert b2.next_batch() is None
    assert b2.complete([9]) == [] and b2.complete([9]) == []  # chunks that do not end the prompt: no token
    assert b2.complete([9]) == [("token", "x", 9), ("done", "x", "length")]
    assert b2.releases == [0]


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6), st.integers(0, 5)), min_size=1, max_size=6),
       budget=st.integers(1, 24), stages=st.integers(1, 3), groups=st.integers(1, 3), max_seqs=st.integers(1, 4))
def test_every_prompt_position_is_sent_once_in_order_and_every_request_ends(prompts, budget, stages, groups,
                                                                           max_seqs):
    b = Batcher(max_seqs=max_seqs, groups=groups, stages=stages, prefill_tokens=budget, context_len=1000)
    sent: list[list[Part]] = []
    pending = sorted(enumerate(prompts), key=lambda x: x[1][2])  # (request, (prompt, new tokens, arrival round))
    done: dict[str, str] = {}
    tokens: dict[str, int] = {}
    request_of: dict[int, int] = {}
    for step in range(2000):
        while pending and pending[0][1][2] <= step:
            i, (n, new, _) = pending.pop(0)
            request_of[b.add(Seq(req_id=f"r{i}", tokens=list(range(n)), max_new=new))] = i
        for ev in _step(b, sent):
            if ev[0] == "done":
                done[ev[1]] = ev[2]
            else:
                tokens[ev[1]] = tokens.get(ev[1], 0) + 1
        assert len(b.in_flight) <= stages
        if not pending and not b.seqs:
            break
    assert done == {f"r{i}": "length" for i in range(len(prompts))}
    assert tokens == {f"r{i}": new for i, (_, new, _) in enumerate(prompts)}
    by_seq: dict[int, list[Part]] = {}
    for parts in sent:
        assert sum(p.n for p in parts if not p.decode) <= budget
        for p in parts:
            by_seq.setdefault(p.sid, []).append(p)
    for sid, parts in by_seq.items():
        n, new, _ = prompts[request_of[sid]]
        assert [p.start for p in parts] == [sum(q.n for q in parts[:i]) for i in range(len(parts))]  # contiguous
        assert sum(p.n for p in parts if not p.decode) == n  # the prompt, once
        assert sum(p.sample for p in parts) == new
