"""Emulated devices: a CPU worker slowed to a relative speed, with a memory cap it cannot pass.

Written by hand because no library emulates unequal chips. The mechanism is the one measured as
most faithful on these 2-core machines (docs/emulation.md, "Facts measured on CPU"): measure the worker's solo
time for a unit of work once, then pad every unit of real work to `slack x solo / speed` with a
sleep. CPU quotas were bursty and sleeping in proportion to measured time compounded contention.

The memory cap counts what a real chip would hold: parameters, gradients and optimizer state
(each storage once), plus the activations autograd saves for backward while they are alive.
Passing the cap raises DeviceMemoryError, as an out-of-memory error would on a real chip.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch

from chipfuse.errors import DeviceMemoryError


class Pacer:
    """Pads work so that a unit of it takes `slack * unit_s / speed` seconds of wall time."""

    def __init__(self, *, speed: float, unit_s: float, slack: float = 1.1):
        self.speed = speed
        self.unit_s = unit_s
        self.slack = slack
        self.padded_s = 0.0

    def target_s(self, units: float) -> float:
        return self.slack * self.unit_s * units / self.speed

    def pad(self, started_at: float, units: float) -> float:
        """Sleep until `started_at + target_s(units)`; return the seconds slept (0 if late)."""
        wait = started_at + self.target_s(units) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            self.padded_s += wait
            return wait
        return 0.0


def solo_time(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeats` wall time of fn(): the undisturbed time of one unit of work."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class MemoryMeter:
    """Counts the bytes an emulated device holds and refuses to pass `cap_bytes`."""

    def __init__(self, *, device_name: str, cap_bytes: int | None,
                 transient: Callable[[], Iterable[torch.Tensor]] | None = None):
        self.device_name = device_name
        self.cap_bytes = cap_bytes
        self.transient = transient
        """Tensors alive now that are neither static nor saved for backward (parameters FSDP2 gathered
        for compute): counted at their current size at every check, each storage once."""
        self.static_bytes = 0
        self.live_act_bytes = 0
        self.peak_bytes = 0
        self._act: dict[int, list] = {}  # storage id -> [storage, refs]
        self._skip: set[int] = set()

    def set_static(self, tensors: Iterable[torch.Tensor | None], *, what: str = "model state") -> int:
        """Count parameters, gradients and optimizer state: each storage once."""
        seen: dict[int, int] = {}
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            for local in plain_parts(t):
                seen[local.untyped_storage().data_ptr()] = _nbytes(local)
        self.static_bytes = sum(seen.values())
        self._skip = {ptr for ptr in seen if ptr}  # 0: empty storages, never an activation's
        self._check(what)
        return self.static_bytes

    def _live_bytes(self) -> int:
        # Sizes now, not when saved: a storage freed since (FSDP2 reshard) no longer counts.
        storages = {key: entry[0] for key, entry in self._act.items()}
        if self.transient is not None:
            for t in self.transient():
                st = t.untyped_storage()
                if st.data_ptr() not in self._skip:
                    storages.setdefault(st._cdata, st)
        return sum(st.nbytes() for st in storages.values())

    def check(self, what: str = "gathered parameters") -> None:
        """Count and check now (hooks call this where no tensor is saved, e.g. before a block runs)."""
        self._check(what)

    def _check(self, what: str) -> None:
        self.live_act_bytes = self._live_bytes()
        total = self.static_bytes + self.live_act_bytes
        self.peak_bytes = max(self.peak_bytes, total)
        if self.cap_bytes is not None and total > self.cap_bytes:
            raise DeviceMemoryError(
                f"device {self.device_name!r} (emulated) is out of memory while holding {what}: "
                f"needs {total / 2**20:.1f} MiB, cap is {self.cap_bytes / 2**20:.1f} MiB. "
                "Fix: give it a smaller share or micro-batch, turn on activation checkpointing or "
                "sharding in the plan, or let `chipfuse plan` choose a plan that fits."
            )

    def _pack(self, t: torch.Tensor) -> object:
        if t.device.type == "meta" or type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return t  # tensor subclasses (DTensor...) hold plain tensors that are counted where they live
        storage = t.untyped_storage()
        if storage.data_ptr() in self._skip:
            return t
        # Keyed by the storage itself, not its address: FSDP2 frees gathered parameters by resizing
        # their storage to 0 bytes (address 0) while autograd still holds views of them.
        key = storage._cdata
        entry = self._act.get(key)
        if entry is None:
            self._act[key] = [storage, 1]
            self._check("activations")
        else:
            entry[1] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self._act.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._act[key]
            self.live_act_bytes = self._live_bytes()

    @staticmethod
    def _unpack(x: object) -> torch.Tensor:
        return x.t if isinstance(x, _Saved) else x  # type: ignore[return-value]

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count activations saved for backward inside this block (forward and backward)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield


def plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t`'s bytes: a DTensor's local shard, a quantised subclass's parts."""
    if hasattr(t, "to_local"):
        t = t.to_local()  # DTensor shards: only the local part
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in plain_parts(getattr(t, n))]
    return [t]


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.t = t


def model_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
    if optimizer is not None:
        for st in optimizer.state.values():
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out
