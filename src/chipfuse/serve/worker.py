"""One serving stage per process: `python -m chipfuse.serve.worker SPEC_JSON` under RANK/WORLD_SIZE.

Rank i holds stage i of the ServePlan (its layers and their KV caches, one cache per sequence). Rank 0
also schedules: it takes requests from the frontend (chipfuse.serve.engine) over a local connection,
forms groups of sequences between decode steps (continuous batching: a request joins at its prefill and
leaves when it stops), keeps up to one group per stage in flight so that all stages work at once, and
sends each group's hidden states down the pipeline; the last rank samples one token per sequence and
returns the tokens to rank 0. Tensors travel over torch.distributed point-to-point (gloo on CPU).

Message from stage i to i+1 (and from the last stage back to 0):
  header int64[4]   op (STEP / STOP), sequences n, tokens T, releases r
  releases int64[r] sequence ids whose KV caches every stage frees
  meta int64[n, 3]  sequence id, start position, tokens of this step
  sampling f64[n,3] temperature, top-p, seed (read by the last stage)
  payload           token ids int64[T] (into stage 0) / hidden states [T, h] / sampled tokens int64[n] (back)
Sequences inside a group run one after another through each layer (one KV cache each), so every token
equals what transformers computes for that sequence alone.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

STEP, STOP = 1, 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(kw_only=True)
class Seq:
    req_id: str
    tokens: list[int]
    max_new: int
    temperature: float
    top_p: float
    seed: int
    stop_ids: tuple[int, ...]
    cached: int = 0
    generated: int = 0
    in_flight: bool = False
    cancelled: bool = False


@dataclass(kw_only=True)
class Group:
    ids: list[int]
    meta: torch.Tensor
    samp: torch.Tensor
    releases: list[int] = field(default_factory=list)


class Stage:
    def __init__(self, spec: dict[str, Any], rank: int):
        from chipfuse.runtime.emulate import Pacer
        from chipfuse.serve.hf import StageModel

        plan = spec["plan"]
        st = plan["stages"][rank]
        self.rank, self.k = rank, len(plan["stages"])
        self.dtype = DTYPES[plan["dtype"]]
        self.model = StageModel(spec["model_dir"], st["first_layer"], st["num_layers"], dtype=self.dtype)
        if st["weight_dtype"] in ("int8", "int4"):
            from chipfuse.serve.quant import quantize_layers

            quantize_layers(self.model, st["weight_dtype"])
        self.caches: dict[int, Any] = {}
        self.gens: dict[int, torch.Generator] = {}
        # An emulated device takes the time the cost model gives its chip (chipfuse.plan.serve.stage_times),
        # scaled to this machine's clock; Pacer pads the real computation to it.
        self.pace = spec["pace"][rank]
        self.pacer = Pacer(speed=1.0, unit_s=1.0, slack=1.0) if self.pace else None
        self.device = st["device"]
        self.fail_after = int(spec.get("fail_after_steps", {}).get(self.device, 0) or 0)
        self.steps = 0

    def release(self, ids: list[int]) -> None:
        for i in ids:
            self.caches.pop(i, None)
            self.gens.pop(i, None)

    def run(self, meta: torch.Tensor, samp: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """This stage's part of one group step; on the last stage, the sampled tokens."""
        t0 = time.perf_counter()
        self.steps += 1
        if self.fail_after and self.steps > self.fail_after:
            print(f"chipfuse serve: device {self.device} lost (fault injected after {self.fail_after} steps)",
                  file=sys.stderr, flush=True)
            os._exit(17)
        outs: list[Any] = []
        off, decode, prefill_s = 0, 0, 0.0
        for (sid, start, n), (temp, top_p, seed) in zip(meta.tolist(), samp.tolist(), strict=True):
            if start == 0:
                self.caches[sid] = self.model.new_cache()
                if self.model.last:
                    self.gens[sid] = torch.Generator().manual_seed(int(seed))
            x = payload[off:off + n].unsqueeze(0)
            off += n
            if start == 0 or n > 1:
                prefill_s += self.pace["prefill_s"][min(n, len(self.pace["prefill_s"]) - 1)] if self.pace else 0.0
            else:
                decode += 1
            y = self.model(x, start, self.caches[sid])
            outs.append(sample(y, temp, top_p, self.gens.get(sid)) if self.model.last else y[0])
        if self.pacer is not None:
            dec = self.pace["decode_s"]
            self.pacer.pad(t0, (dec[min(decode, len(dec) - 1)] if decode else 0.0) + prefill_s)
        if self.model.last:
            return torch.tensor(outs, dtype=torch.int64)
        return torch.cat(outs) if outs else torch.empty(0, self.model.config.hidden_size, dtype=self.dtype)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature and nucleus (top-p) sampling with transformers' warpers."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits[None])
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, -1)[0], 1, generator=gen))


class Sender:
    """Non-blocking sends. Blocking ones deadlock the ring: rank 0 sending to 1 while 1 sends to 2 while the
    last rank sends its tokens back to 0. Each tensor is kept until its send completes; at most one group per
    stage is in flight, so the backlog stays small."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, torch.Tensor]] = []

    def send(self, t: torch.Tensor, dst: int) -> None:
        t = t.contiguous()
        self.pending.append((dist.isend(t, dst), t))
        self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]

    def flush(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []


SENDER = Sender()


def _send(t: torch.Tensor, dst: int) -> None:
    SENDER.send(t, dst)


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    if t.numel():
        dist.recv(t, src)
    return t


def send_group(dst: int, op: int, meta: torch.Tensor, samp: torch.Tensor, releases: list[int],
               payload: torch.Tensor) -> None:
    _send(torch.tensor([op, meta.shape[0], payload.shape[0], len(releases)], dtype=torch.int64), dst)
    for t in (torch.tensor(releases, dtype=torch.int64), meta, samp, payload):
        if t.numel():
            _send(t, dst)


def recv_group(src: int, hidden: int, dtype: torch.dtype, tokens_in: bool) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                                     list[int], torch.Tensor]:
    h = _recv((4,), torch.int64, src).tolist()
    op, n, T, r = h
    releases = _recv((r,), torch.int64, src).tolist()
    meta = _recv((n, 3), torch.int64, src)
    samp = _recv((n, 3), torch.float64, src)
    payload = _recv((T,), torch.int64, src) if tokens_in else _recv((T, hidden), dtype, src)
    return op, meta, samp, releases, payload


def middle_loop(stage: Stage) -> None:
    """Ranks 1..k-1: receive a group, run it, pass it on (the last rank returns tokens to rank 0)."""
    hidden = stage.model.config.hidden_size
    prev, nxt = stage.rank - 1, (stage.rank + 1) % stage.k
    while True:
        op, meta, samp, releases, payload = recv_group(prev, hidden, stage.dtype, tokens_in=False)
        stage.release(releases)
        if op == STOP:
            if not stage.model.last:
                send_group(nxt, STOP, meta, samp, releases, payload)
            return
        out = stage.run(meta, samp, payload)
        if stage.model.last:
            send_group(nxt, STEP, meta, samp, [], out)
        else:
            send_group(nxt, STEP, meta, samp, releases, out)


class Scheduler:
    """Rank 0: requests in, groups out, tokens back to the frontend."""

    def __init__(self, stage: Stage, conn: Any, spec: dict[str, Any]):
        self.stage, self.conn = stage, conn
        self.k = stage.k
        self.context_len = spec["plan"]["context_len"]
        self.max_seqs = spec["plan"]["concurrency"]
        # Groups in flight (the plan's choice; 0: one per stage): each stage steps every group once per token.
        self.groups = spec["plan"].get("groups") or min(self.k, self.max_seqs)
        self.seqs: dict[int, Seq] = {}
        self.waiting: list[int] = []  # admitted once a slot frees (the KV cache is sized for max_seqs)
        self.by_req: dict[str, int] = {}
        self.releases: list[int] = []
        self.in_flight: list[Group] = []
        self.next_id = 0
        self.stopping = False

    # ---------------------------------------------------------------- frontend messages
    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, req_id, prompt, max_new, temperature, top_p, seed, stop_ids = msg
            sid = self.next_id
            self.next_id += 1
            self.seqs[sid] = Seq(req_id=req_id, tokens=list(prompt), max_new=max_new, temperature=temperature,
                                 top_p=top_p, seed=seed, stop_ids=tuple(stop_ids))
            self.by_req[req_id] = sid
            self.waiting.append(sid)
        elif kind == "cancel":
            got = self.by_req.get(msg[1])
            if got is not None and got in self.seqs:
                self.seqs[got].cancelled = True
                if not self.seqs[got].in_flight:
                    self._finish(got, "cancelled")
        elif kind == "stop":
            self.stopping = True

    def _finish(self, sid: int, reason: str) -> None:
        s = self.seqs.pop(sid)
        self.by_req.pop(s.req_id, None)
        if sid in self.waiting:
            self.waiting.remove(sid)
        elif s.cached:
            self.releases.append(sid)
        self.conn.send(("done", s.req_id, reason))

    def active(self) -> list[int]:
        return [sid for sid in self.seqs if sid not in self.waiting]

    # ---------------------------------------------------------------- the pipeline
    def next_group(self) -> Group | None:
        while self.waiting and len(self.active()) < self.max_seqs:
            self.waiting.pop(0)
        act = self.active()
        ready = [sid for sid in act if not self.seqs[sid].in_flight]
        if not ready or len(self.in_flight) >= self.groups:
            return None
        size = math.ceil(len(act) / min(len(act), self.groups))
        ids = ready[:size]
        meta, samp, payload = [], [], []
        for sid in ids:
            s = self.seqs[sid]
            s.in_flight = True
            new = s.tokens[s.cached:]
            meta.append([sid, s.cached, len(new)])
            samp.append([s.temperature, s.top_p, float(s.seed)])
            payload.extend(new)
        g = Group(ids=ids, meta=torch.tensor(meta, dtype=torch.int64), samp=torch.tensor(samp, dtype=torch.float64),
                  releases=self.releases)
        self.releases = []
        self.in_flight.append(g)
        self.stage.release(g.releases)
        out = self.stage.run(g.meta, g.samp, torch.tensor(payload, dtype=torch.int64))
        if self.k == 1:
            self.done(out)
        else:
            send_group(1, STEP, g.meta, g.samp, g.releases, out)
        return g

    def done(self, tokens: torch.Tensor) -> None:
        g = self.in_flight.pop(0)
        for sid, n, tok in zip(g.ids, g.meta[:, 2].tolist(), tokens.tolist(), strict=True):
            s = self.seqs[sid]
            s.in_flight = False
            s.cached += n
            if s.cancelled:
                self._finish(sid, "cancelled")
                continue
            s.tokens.append(tok)
            s.generated += 1
            self.conn.send(("token", s.req_id, tok))
            if tok in s.stop_ids:
                self._finish(sid, "stop")
            elif s.generated >= s.max_new:
                self._finish(sid, "length")
            elif len(s.tokens) >= self.context_len:
                self._finish(sid, "context")

    def loop(self) -> None:
        self.conn.send(("ready", {"device": self.stage.device}))
        hidden = self.stage.model.config.hidden_size
        while True:
            timeout = 0 if (self.in_flight or any(not s.in_flight for s in self.seqs.values())) else 0.05
            while self.conn.poll(timeout):
                try:
                    self.handle(self.conn.recv())
                except EOFError:
                    self.stopping = True
                    break
                timeout = 0
            if self.stopping and not self.in_flight:
                if self.k > 1:
                    empty = torch.empty(0, 3, dtype=torch.int64)
                    send_group(1, STOP, empty, empty.double(), [], torch.empty(0, hidden, dtype=self.stage.dtype))
                return
            while not self.stopping and self.next_group() is not None:
                pass
            if self.in_flight and self.k > 1:
                _, _, _, _, tokens = recv_group(self.k - 1, hidden, self.stage.dtype, tokens_in=True)
                self.done(tokens)


def main(argv: list[str] | None = None) -> int:
    import faulthandler
    import signal
    from multiprocessing.connection import Client

    from chipfuse.runtime import dist as cfdist

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck worker is
    argv = argv if argv is not None else sys.argv[1:]
    spec = json.loads(open(argv[0]).read())
    info = cfdist.init(device_kind="cpu", timeout_s=spec.get("timeout_s", 600.0))
    conn = None
    if info.rank == 0:
        conn = Client(tuple(spec["address"]), authkey=bytes.fromhex(spec["authkey"]))
    try:
        stage = Stage(spec, info.rank)
    except Exception as e:  # a bad folder or tensor: tell the frontend in one line, then leave
        if conn is not None:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        print(f"chipfuse serve: stage {info.rank}: {e}", file=sys.stderr, flush=True)
        os._exit(3)
    if info.world_size > 1:
        dist.barrier()
    if info.rank == 0:
        Scheduler(stage, conn, spec).loop()
    else:
        middle_loop(stage)
    SENDER.flush()
    cfdist.shutdown(exit_code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
