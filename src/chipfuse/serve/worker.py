"""One serving stage per process: `python -m chipfuse.serve.worker SPEC_JSON` under RANK/WORLD_SIZE.

Rank i holds stage i of the ServePlan (its layers and their KV caches, one cache per sequence). Rank 0
also schedules: it takes requests from the frontend (chipfuse.serve.engine) over a local connection,
forms micro-batches between steps (continuous batching with chunked prefill: chipfuse.serve.batching
says which sequences and prompt chunks go next), keeps up to one micro-batch per stage in flight so that
all stages work at once, and sends each one's hidden states down the pipeline; the last rank samples one
token per sequence (none for a prompt chunk that does not end its prompt) and returns them to rank 0. Tensors travel over torch.distributed point-to-point (gloo on CPU).

Message from stage i to i+1 (and from the last stage back to 0):
  header int64[4]   op (STEP / STOP), sequences n, tokens T, releases r
  releases int64[r] sequence ids whose KV caches every stage frees
  meta int64[n, 5]  sequence id, start position, tokens of this step, samples (0/1), decode (0/1)
  sampling f64[n,3] temperature, top-p, seed (read by the last stage)
  payload           token ids int64[T] (into stage 0) / hidden states [T, h] / sampled tokens int64[n] (back)
Sequences inside a micro-batch run one after another through each layer (one KV cache each), so every token
equals what transformers computes for that sequence alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.serve.batching import Batcher, Seq

STEP, STOP = 1, 0
META = 5  # sequence id, start position, tokens, samples (0/1), decode (0/1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Stage:
    def __init__(self, spec: dict[str, Any], rank: int):
        from chipfuse.runtime.emulate.device import Pacer
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
        """This stage's part of one micro-batch; on the last stage, the sampled tokens (-1 where a prompt
        chunk that does not end its prompt samples nothing)."""
        t0 = time.perf_counter()
        self.steps += 1
        if self.fail_after and self.steps > self.fail_after:
            print(f"chipfuse serve: device {self.device} lost (fault injected after {self.fail_after} steps)",
                  file=sys.stderr, flush=True)
            os._exit(17)
        outs: list[Any] = []
        off, decode, prefill_tokens = 0, 0, 0
        for (sid, start, n, want, is_decode), (temp, top_p, seed) in zip(meta.tolist(), samp.tolist(), strict=True):
            if start == 0:
                self.caches[sid] = self.model.new_cache()
                if self.model.last:
                    self.gens[sid] = torch.Generator().manual_seed(int(seed))
            # The stage reads its positions from the cache: the scheduler's must be the same.
            assert self.model.module.past(self.caches[sid]) == start, (sid, start)
            x = payload[off:off + n].unsqueeze(0)
            off += n
            decode += is_decode
            prefill_tokens += 0 if is_decode else n
            if not self.model.last:
                outs.append(self.model(x, self.caches[sid])[0])
            elif want:
                outs.append(sample(self.model(x, self.caches[sid]), temp, top_p, self.gens.get(sid)))
            else:
                self.model(x, self.caches[sid], logits=False)  # fills the KV cache only
                outs.append(-1)
        if self.pacer is not None:
            # A real chip runs a micro-batch's prompt tokens as one prefill and its decodes as one step.
            dec, pre = self.pace["decode_s"], self.pace["prefill_s"]
            top = len(pre) - 1
            pre_s = pre[prefill_tokens] if prefill_tokens <= top else pre[top] * prefill_tokens / top
            self.pacer.pad(t0, (dec[min(decode, len(dec) - 1)] if decode else 0.0) + pre_s)
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
    meta = _recv((n, META), torch.int64, src)
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
    """Rank 0: requests in, micro-batches out (chipfuse.serve.batching decides which), tokens back to the
    frontend."""

    def __init__(self, stage: Stage, conn: Any, spec: dict[str, Any]):
        plan = spec["plan"]
        self.stage, self.conn, self.k = stage, conn, stage.k
        # Groups of decoding sequences in flight (the plan's choice; 0: one per stage).
        self.batcher = Batcher(max_seqs=plan["concurrency"], groups=plan.get("groups") or min(self.k, plan["concurrency"]),
                               stages=self.k, prefill_tokens=int(spec.get("prefill_tokens") or 512),
                               context_len=plan["context_len"])
        self.stopping = False

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, req_id, prompt, max_new, temperature, top_p, seed, stop_ids = msg
            self.batcher.add(Seq(req_id=req_id, tokens=list(prompt), max_new=max_new, temperature=temperature,
                                 top_p=top_p, seed=seed, stop_ids=tuple(stop_ids)))
        elif kind == "cancel":
            self.emit(self.batcher.cancel(msg[1]))
        elif kind == "stop":
            self.stopping = True

    def emit(self, events: list[tuple]) -> None:
        for ev in events:
            self.conn.send(ev)

    def send_next(self) -> bool:
        parts = self.batcher.next_batch()
        if parts is None:
            return False
        b = self.batcher
        seqs = [b.seqs[p.sid] for p in parts]
        meta = torch.tensor([[p.sid, p.start, p.n, int(p.sample), int(p.decode)] for p in parts], dtype=torch.int64)
        samp = torch.tensor([[s.temperature, s.top_p, float(s.seed)] for s in seqs], dtype=torch.float64)
        payload = torch.tensor([t for p, s in zip(parts, seqs, strict=True) for t in s.tokens[p.start:p.start + p.n]],
                               dtype=torch.int64)
        releases, b.releases = b.releases, []
        self.stage.release(releases)
        out = self.stage.run(meta, samp, payload)
        if self.k == 1:
            self.emit(b.complete(out.tolist()))
        else:
            send_group(1, STEP, meta, samp, releases, out)
        return True

    def loop(self) -> None:
        self.conn.send(("ready", {"device": self.stage.device}))
        hidden = self.stage.model.config.hidden_size
        b = self.batcher
        while True:
            timeout = 0 if b.has_work() else 0.05
            while self.conn.poll(timeout):
                try:
                    self.handle(self.conn.recv())
                except EOFError:
                    self.stopping = True
                    break
                timeout = 0
            if self.stopping and not b.in_flight:
                if self.k > 1:
                    empty = torch.empty(0, META, dtype=torch.int64)
                    send_group(1, STOP, empty, torch.empty(0, 3, dtype=torch.float64), [],
                               torch.empty(0, hidden, dtype=self.stage.dtype))
                return
            while not self.stopping and self.send_next():
                pass
            if b.in_flight and self.k > 1:
                _, _, _, _, tokens = recv_group(self.k - 1, hidden, self.stage.dtype, tokens_in=True)
                self.emit(b.complete(tokens.tolist()))


def main(argv: list[str] | None = None) -> int:
    import faulthandler
    import signal
    from multiprocessing.connection import Client

    from chipfuse.runtime.launch import dist as cfdist

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
