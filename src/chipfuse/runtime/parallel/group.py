"""A stage group of several devices runs as ONE pipeline stage: its leader talks to the
neighbouring stages (through torch.distributed.pipelining or the local micro-batch loop), the other
members follow it.

Written by hand because this is the heterogeneity: torch.distributed.pipelining joins one rank per
stage, and torchtitan's layout (a pipeline per data-parallel rank, tensor parallel along another
mesh dimension) needs every stage to have the same group size. Here a stage of one device can feed a
tensor-parallel pair that feeds a sharded triple.

- tensor parallel ("tp"): every member computes the whole micro-batch with its slice of the weights
  (runtime/parallel/tp.py); the leader sends each micro-batch to the members, and the gradient of
  the stage output in backward. DTensor's collectives inside the stage make the output, and the
  gradient of the input, whole on every member.
- sharded ("fsdp"): the members split every micro-batch by rows (FSDP2 data parallelism inside the
  group); the leader scatters the rows, gathers the outputs, scatters the output gradient, and in
  backward gathers the members' input gradients into its own.

Every message is a point-to-point send inside the stage group: a header (command, dtype, shape),
then the tensor. Followers keep their forward outputs in arrival order: GPipe and 1F1B run the
backward of micro-batches in forward order, so the oldest output is always the next to go back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

FWD, BWD, END = 1, 2, 3
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
_HEADER = 8


class GroupStage(nn.Module):
    """Wraps a stage module (already parallelized) on every member of a stage group."""

    def __init__(self, inner: nn.Module, *, members: tuple[int, ...], split: bool, group: Any = None,
                 input_grads: bool = True):
        super().__init__()
        self.inner = inner
        self.members = members
        self.split = split
        self.group = group
        self.input_grads = input_grads
        """False on a first stage: its input is token ids."""
        self.me = dist.get_rank()
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def leader(self) -> int:
        return self.members[0]

    @property
    def followers(self) -> tuple[int, ...]:
        return self.members[1:]

    # ------------------------------------------------------------------ messages
    def _comm(self) -> torch.device:
        """Where this group's messages live: host memory on gloo, the chip on a native library."""
        return torch.device("cpu") if dist.get_backend(self.group) == "gloo" else self._device()

    def _send(self, to: int, cmd: int, t: torch.Tensor | None = None) -> None:
        h = torch.zeros(_HEADER, dtype=torch.int64)
        h[0] = cmd
        if t is not None:
            h[1] = _DTYPES.index(t.dtype)
            h[2] = t.dim()
            h[3:3 + t.dim()] = torch.tensor(t.shape)
        dist.send(h.to(self._comm()), dst=to, group=self.group)
        if t is not None:
            dist.send(t.contiguous().to(self._comm()), dst=to, group=self.group)

    def _recv(self, frm: int, like: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        h = torch.zeros(_HEADER, dtype=torch.int64, device=self._comm())
        dist.recv(h, src=frm, group=self.group)
        h = h.cpu()
        cmd = int(h[0])
        if cmd == END:
            return cmd, None
        shape = torch.Size(int(x) for x in h[3:3 + int(h[2])])
        return cmd, self._recv_tensor(frm, shape, _DTYPES[int(h[1])])

    def _recv_tensor(self, frm: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self._comm())
        dist.recv(t, src=frm, group=self.group)
        return t.to(self._device())

    def _device(self) -> torch.device:
        p = next(self.inner.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ leader
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.me != self.leader:
            raise RuntimeError("GroupStage.forward runs on the group's leader; the others call follow()")
        if not self.split:
            for r in self.followers:
                self._send(r, FWD, x.detach())
            return _NotifyBackward.apply(self.inner(x), self)
        parts = list(x.tensor_split(len(self.members)))
        for r, part in zip(self.followers, parts[1:], strict=True):
            self._send(r, FWD, part.detach())
        mine = parts[0]
        if self.input_grads and x.requires_grad:
            # Runs in backward after the whole local chunk: then the members' input gradients exist.
            mine = _JoinInputGrads.apply(self, *parts)
        y_local = self.inner(mine)
        rows = [p.shape[0] for p in parts]
        return _Gather.apply(y_local, self, rows)

    def end(self) -> None:
        """The leader's micro-batches of this step are done: release the followers."""
        for r in self.followers:
            self._send(r, END)

    # ------------------------------------------------------------------ followers
    def follow(self) -> None:
        """Serve the leader's forwards and backwards until it calls end()."""
        while True:
            cmd, t = self._recv(self.leader)
            if cmd == END:
                assert not self._saved, "a forward was never taken back"
                return
            assert t is not None
            if cmd == FWD:
                x = t.requires_grad_(self.input_grads and t.is_floating_point())
                y = self.inner(x)
                if self.split:
                    self._send_plain(y.detach())
                if torch.is_grad_enabled():  # training: its backward comes later (evaluation has none)
                    self._saved.append((x, y))
            else:  # BWD: t is the gradient of the oldest saved output
                x, y = self._saved.pop(0)
                torch.autograd.backward(y, t)
                if self.split and self.input_grads:
                    g = x.grad if x.grad is not None else torch.zeros_like(x)
                    self._send_plain(g)

    def _send_plain(self, t: torch.Tensor) -> None:
        dist.send(t.contiguous().to(self._comm()), dst=self.leader, group=self.group)


class _NotifyBackward(torch.autograd.Function):
    """Identity; in backward, sends the output gradient to the tensor-parallel followers first, so
    that they run the same backward (and its collectives) as the leader."""

    @staticmethod
    def forward(ctx, y, stage):  # type: ignore[override]
        ctx.stage = stage
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        for r in ctx.stage.followers:
            ctx.stage._send(r, BWD, g)
        return g, None


class _Gather(torch.autograd.Function):
    """Sharded group: the whole micro-batch's output from every member's rows, and in backward each
    member's rows of the output gradient."""

    @staticmethod
    def forward(ctx, y_local, stage, rows):  # type: ignore[override]
        ctx.stage, ctx.rows = stage, rows
        outs = [y_local]
        for r, n in zip(stage.followers, rows[1:], strict=True):
            outs.append(stage._recv_tensor(r, torch.Size((n, *y_local.shape[1:])), y_local.dtype))
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        parts = g.tensor_split(len(ctx.rows))
        for r, part in zip(ctx.stage.followers, parts[1:], strict=True):
            ctx.stage._send(r, BWD, part)
        return parts[0], None, None


class _JoinInputGrads(torch.autograd.Function):
    """Sharded group, not the first stage: forward passes the leader's rows on; backward (reached
    after the leader's own backward) adds the followers' input gradients for their rows."""

    @staticmethod
    def forward(ctx, stage, *parts):  # type: ignore[override]
        ctx.stage = stage
        ctx.shapes = [(p.shape, p.dtype) for p in parts]
        return parts[0].view_as(parts[0])

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        rest = [ctx.stage._recv_tensor(r, shape, dtype)
                for r, (shape, dtype) in zip(ctx.stage.followers, ctx.shapes[1:], strict=True)]
        return (None, g, *rest)
