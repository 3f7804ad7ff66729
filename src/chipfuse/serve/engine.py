"""The frontend of a serving job: starts one worker process per stage of a ServePlan, feeds requests to
rank 0 and delivers tokens back, and re-places the model on the survivors when a device is lost.

Workers are started as training's supervisor starts them (torchrun's environment, the rendezvous store
hosted here: runtime.launch.dist.rendezvous), one subprocess per rank with one thread each, so that the
frontend knows which device's process died.
A lost device is reported; the frontend stops the other workers, plans again without it
(chipfuse.plan.serve), starts the new pipeline and resubmits every unfinished request with the tokens
it has produced so far (greedy requests continue exactly; sampled ones continue from a fresh seed).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from chipfuse.cluster.pool import Pool
from chipfuse.errors import ChipfuseError
from chipfuse.plan.serve import ServePlan, fastest_layer_step_s, plan_serve, stage_times
from chipfuse.runtime.launch import dist as cfdist

Event = tuple  # ("token", id) | ("done", reason) | ("error", message)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    emulated_step_s: float = 0.0
    """Emulated devices are paced to the cost model's times for their chips (docs/serve.md), scaled so that
    one layer's decode step of one sequence on the pool's fastest device takes this many seconds (the same
    clock for every plan on the pool); 0: no pacing (tests)."""
    start_timeout_s: float = 120.0
    fail_after_steps: dict[str, int] = field(default_factory=dict)
    """Fault injection for rehearsal and tests: device -> its process exits after that many steps."""
    replan: bool = True
    """On a lost device, re-place the model on the survivors (else stop answering)."""
    prefill_chunk_tokens: int = 512
    """Prompt tokens one micro-batch carries at most (chunked prefill, chipfuse.serve.batching): a longer
    prompt is prefilled over several micro-batches while the requests already decoding keep going."""


@dataclass(kw_only=True)
class Request:
    prompt: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    on_event: Callable[[Event], None] = lambda ev: None
    generated: list[int] = field(default_factory=list)
    id: str = ""


class Engine:
    def __init__(self, model_dir: str | Path, pool: Pool, plan: ServePlan, cfg: ServeConfig | None = None):
        self.model_dir, self.pool, self.plan = str(model_dir), pool, plan
        self.cfg = cfg or ServeConfig()
        if self.cfg.prefill_chunk_tokens < 1:
            raise ChipfuseError(f"prefill chunk of {self.cfg.prefill_chunk_tokens} tokens. Fix: use at least 1")
        self.requests: dict[str, Request] = {}
        self.lock = threading.RLock()
        self.lost: list[str] = []
        self.notes: list[str] = []
        self.failed: str | None = None
        self.quality: dict[str, Any] | None = None
        """The int8/int4 check (chipfuse.serve.quant.quality_report), when the frontend ran it."""
        self._ids = itertools.count()
        self._procs: list[subprocess.Popen] = []
        self._conn: Any = None
        self._closing = False
        self._tmp = tempfile.TemporaryDirectory(prefix="chipfuse-serve-")
        self._store: Any = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        self._launch()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        return self

    def _launch(self) -> None:
        k = len(self.plan.stages)
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        spec = {"plan": self.plan.to_dict(), "model_dir": self.model_dir, "pace": self.pace_tables(),
                "prefill_tokens": self.cfg.prefill_chunk_tokens,
                "address": list(listener.address), "authkey": authkey.hex(),
                "fail_after_steps": {d: n for d, n in self.cfg.fail_after_steps.items() if d not in self.lost}}
        run = Path(self._tmp.name) / f"run{len(self.lost)}"
        run.mkdir(exist_ok=True)
        (run / "spec.json").write_text(json.dumps(spec))
        # The rendezvous training's launcher uses: a store held here while this pipeline runs.
        self._store, rdzv = cfdist.rendezvous(k)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **rdzv)
        self._procs = []
        for r in range(k):
            log = open(run / f"rank{r}.log", "w")
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "chipfuse.serve.worker", str(run / "spec.json")],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log, stderr=subprocess.STDOUT))
        listener._listener._socket.settimeout(self.cfg.start_timeout_s)  # type: ignore[attr-defined]
        try:
            self._conn = listener.accept()
        except (TimeoutError, OSError):
            self._kill()
            raise ChipfuseError(f"serving workers did not start within {self.cfg.start_timeout_s:.0f} s; "
                                f"{self._log_tail(run)}. Fix: check the model folder and the pool") from None
        finally:
            listener.close()
        deadline = time.time() + self.cfg.start_timeout_s
        while not self._conn.poll(0.2):
            dead = [r for r, p in enumerate(self._procs) if p.poll() not in (None, 0)]
            if dead or time.time() > deadline:
                self._kill()
                raise ChipfuseError(f"serving worker {dead[0] if dead else '?'} failed at start: "
                                    f"{self._log_tail(run)}. Fix: see the message above")
        msg = self._conn.recv()
        if msg[0] == "error":
            self._kill()
            raise ChipfuseError(f"{self.model_dir}: {msg[1]}")
        self._run = run

    def pace_tables(self) -> list[dict[str, list[float]] | None]:
        """Per stage, the seconds an emulated device's steps take (None: a real device, not paced)."""
        if not self.cfg.emulated_step_s:
            return [None] * len(self.plan.stages)
        tables = stage_times(self.plan, self.pool)
        scale = self.cfg.emulated_step_s / fastest_layer_step_s(self.plan, self.pool)
        return [{k: [x * scale for x in v] for k, v in t.items()} if self.pool.device(s.device).emulated else None
                for s, t in zip(self.plan.stages, tables, strict=True)]

    def _log_tail(self, run: Path) -> str:
        lines = []
        for f in sorted(run.glob("rank*.log")):
            got = [ln for ln in f.read_text().splitlines() if ln.strip()]
            if got:
                lines.append(f"{f.stem}: {got[-1]}")
        return "; ".join(lines) or "no worker output"

    def _kill(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            p.wait()

    def close(self) -> None:
        with self.lock:
            self._closing = True
            try:
                if self._conn is not None:
                    self._conn.send(("stop",))
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self._tmp.cleanup()

    # ---------------------------------------------------------------- requests
    def submit(self, req: Request) -> str:
        with self.lock:
            if self.failed:
                raise ChipfuseError(self.failed)
            req.id = req.id or f"r{next(self._ids)}"
            self.requests[req.id] = req
            self._send_add(req)
        return req.id

    def _send_add(self, req: Request) -> None:
        self._conn.send(("add", req.id, req.prompt + req.generated, req.max_new - len(req.generated),
                         req.temperature, req.top_p, req.seed, list(req.stop_ids)))

    def cancel(self, req_id: str) -> None:
        with self.lock:
            if req_id in self.requests:
                try:
                    self._conn.send(("cancel", req_id))
                except OSError:
                    pass

    def generate(self, prompt: list[int], max_new: int, **kw: Any) -> tuple[list[int], str]:
        """One request, blocking: (tokens, finish reason)."""
        done = threading.Event()
        out: dict[str, Any] = {}

        def on(ev: Event) -> None:
            if ev[0] != "token":
                out["end"] = ev
                done.set()

        req = Request(prompt=prompt, max_new=max_new, on_event=on, **kw)
        self.submit(req)
        done.wait()
        if out["end"][0] == "error":
            raise ChipfuseError(out["end"][1])
        return req.generated, out["end"][1]

    # ---------------------------------------------------------------- the pump thread
    def _pump(self) -> None:
        while True:
            try:
                ready = self._conn.poll(0.1)
                msg = self._conn.recv() if ready else None
            except (EOFError, OSError):
                msg, ready = None, False
                if self._closing:
                    return
                if not self._recover():
                    return
                continue
            if msg is None:
                if self._closing:
                    return
                if any(p.poll() is not None for p in self._procs) and not self._recover():
                    return
                continue
            with self.lock:
                req = self.requests.get(msg[1])
                if req is None:
                    continue
                if msg[0] == "token":
                    req.generated.append(msg[2])
                    req.on_event(("token", msg[2]))
                elif msg[0] == "done":
                    del self.requests[msg[1]]
                    req.on_event(("done", msg[2]))

    def _recover(self) -> bool:
        """A worker died: name the device, re-place on the survivors, resubmit what was unfinished."""
        time.sleep(0.5)  # let the first failure surface before the others time out
        dead = [(p.poll(), r) for r, p in enumerate(self._procs) if p.poll() not in (None, 0)]
        self._kill()
        with self.lock:
            if not dead:
                self.failed = "the serving pipeline stopped unexpectedly"
            else:
                # The first to exit with its own code is the lost device; the rest fail on its closed sockets.
                rank = next((r for code, r in dead if code == 17), dead[0][1])
                device = self.plan.stages[rank].device
                self.lost.append(device)
                note = f"device {device} lost (stage {rank}, exit code {self._procs[rank].returncode})"
                self.notes.append(note)
                print(f"chipfuse serve: {note}", file=sys.stderr, flush=True)
                survivors = [d.name for d in self.pool.devices if d.name not in self.lost]
                if not self.cfg.replan or not survivors:
                    self.failed = f"{note}; no devices left to serve on"
                else:
                    try:
                        sub = self.pool.subset(survivors)
                        res = plan_serve(sub, self.plan.model, context_len=self.plan.context_len,
                                         concurrency=self.plan.concurrency, prompt_tokens=self.plan.prompt_tokens,
                                         dtype=self.plan.dtype)
                        self.plan = replace(res.best.plan, pool=self.pool.name)
                        self._launch()
                        placed = ", ".join(f"{s.device}:{s.num_layers}" for s in self.plan.stages)
                        self.notes.append(f"re-placed on {placed}")
                        print(f"chipfuse serve: re-placed on {placed}", file=sys.stderr, flush=True)
                        for req in self.requests.values():
                            self._send_add(req)
                        return True
                    except ChipfuseError as e:
                        self.failed = f"{note}; cannot re-place on the survivors: {e}"
            for req in list(self.requests.values()):
                req.on_event(("error", self.failed))
            self.requests.clear()
            return False


def start_engine(model_dir: str | Path, pool: Pool, *, context_len: int | None = None, concurrency: int = 8,
                 dtype: str = "fp32", plan: ServePlan | None = None, cfg: ServeConfig | None = None) -> Engine:
    """Plan (unless given) and start a serving engine for a Hugging Face folder on a pool."""
    from chipfuse.serve.hf import model_spec

    if plan is None:
        spec = model_spec(model_dir)
        ctx = min(context_len or spec.seq_len, spec.seq_len)
        plan = plan_serve(pool, spec, context_len=ctx, concurrency=concurrency, dtype=dtype).best.plan
    return Engine(model_dir, pool, plan, cfg).start()
