"""Islands: synchronous training inside groups of well-connected devices, DiLoCo between them.

Inside an island every inner step all-reduces gradients (SUM, rescaled to the island's mean
gradient: see DiLoCo.sync_inner_grads). Across islands,
over a slow link, only every H inner steps: each island's pseudo-gradient (parameters at the last
outer step minus its parameters now) is averaged, weighted by the island's share of the round's
tokens, and an outer SGD step with Nesterov momentum (torch.optim.SGD, nesterov=True, on a copy of
the global parameters) gives the new global parameters every island starts from (DiLoCo,
Douillard et al. 2023). The cross-island payload may travel as bf16 or fp16.

Unequal islands (the island rule): an island's batch share is proportional to its speed (the sum
of its devices' shares in the plan, which the planner sets by speed and the trainer's rebalancer
keeps by measured speed), with one H for all. Every island then ends a round at about the same
wall time, and every inner step consumes exactly the global batch that synchronous training
would. The outer weights follow the samples each island really processed in the round.

Written by hand: torchft's DiLoCo needs its fault-tolerance Manager (a lighthouse server and a
quorum) and is not a dependency; DDP comm hooks act on gradients each step, not on parameters
every H steps (see docs/slow_links.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.errors import PlanError
from chipfuse.runtime.emulate.links import EmulatedLink
from chipfuse.runtime.launch.dist import collective_timeout

COMPRESSION_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class IslandGroups:
    """This rank's view of the island layout and the process groups that serve it."""

    islands: tuple[tuple[int, ...], ...]
    """Ranks of each island; the first rank of an island is its leader on the slow link."""
    index: int
    """The island this rank belongs to."""
    rank: int
    group: dist.ProcessGroup | None
    """This island's group (None when the island is this rank alone)."""
    leaders: dist.ProcessGroup | None
    """Group of the island leaders (None on ranks that lead no island, or with one island)."""

    @property
    def leader(self) -> int:
        return self.islands[self.index][0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def island_size(self) -> int:
        return len(self.islands[self.index])


def make_island_groups(islands: Sequence[Sequence[int]], *, rank: int, world_size: int) -> IslandGroups:
    """Create every island's group and the leaders' group, in the same order on every rank
    (torch.distributed.new_group is collective over the whole job)."""
    isl = tuple(tuple(int(r) for r in i) for i in islands)
    flat = sorted(r for i in isl for r in i)
    if flat != list(range(world_size)) or any(not i for i in isl):
        raise PlanError(f"sync.islands: ranks {[list(i) for i in isl]} do not cover ranks 0..{world_size - 1} "
                        "exactly once. Fix: put every device of the plan in exactly one island")
    # Each with the job's collective timeout: a slow link that goes down is noticed, not waited on.
    groups = [dist.new_group(list(i), timeout=collective_timeout()) if len(i) > 1 else None for i in isl]
    leaders = dist.new_group([i[0] for i in isl], timeout=collective_timeout()) if len(isl) > 1 else None
    index = next(k for k, i in enumerate(isl) if rank in i)
    return IslandGroups(islands=isl, index=index, rank=rank, group=groups[index],
                        leaders=leaders if rank == isl[index][0] else None)


@dataclass(kw_only=True)
class Segment:
    """Parameters that the same ranks hold, with the groups that sync them. One-device replicas hold
    the whole model: one segment, synced over the island and over the island leaders. Replicas that
    are pipelines hold a few units (embedding, blocks, head) per rank: one segment per set of
    holders, synced over this island's holders (`inner`) and over one holder per island (`cross`,
    the lowest rank of each island's holders, the only ones that use the slow link)."""

    names: list[str]
    """The parameters' names in the whole model: checkpoint keys shared by every holder."""
    params: list[torch.Tensor]
    inner: dist.ProcessGroup | None
    """This island's holders of the segment (None when this rank is the only one)."""
    inner_src: int
    """The holder in this island that takes part in `cross` and broadcasts its result."""
    cross: dist.ProcessGroup | None
    """One holder per island (None on ranks outside it, or with one island)."""
    link: EmulatedLink | None = None
    """The slow link `cross` runs over, when it is emulated."""


def make_segments(holder_sets: Sequence[tuple[int, ...]], mine: dict[tuple[int, ...], tuple[list[str], list[Any]]],
                  groups: IslandGroups, *, link: Callable[[dist.ProcessGroup], EmulatedLink] | None = None
                  ) -> list[Segment]:
    """Segments for this rank from every set of ranks that hold the same units (`holder_sets`, the
    same list in the same order on every rank: torch.distributed.new_group is collective) and the
    (names, parameters) this rank holds of each (`mine`). A set of ranks that is an island, or the
    island leaders, reuses the island's group."""
    known: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for k, isl in enumerate(groups.islands):
        known[tuple(sorted(isl))] = groups.group if k == groups.index else None
    leaders = tuple(sorted(i[0] for i in groups.islands))
    known.setdefault(leaders, groups.leaders)

    def group(ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        if len(ranks) < 2:
            return None
        if ranks not in known:
            g = dist.new_group(list(ranks), timeout=collective_timeout())
            known[ranks] = g if groups.rank in ranks else None
        return known[ranks]

    out = []
    for holders in holder_sets:
        inner_sets = [tuple(sorted(set(holders) & set(isl))) for isl in groups.islands]
        if any(not s for s in inner_sets):
            raise PlanError(f"sync.islands: ranks {list(holders)} hold some layers but island(s) "
                            f"{[k for k, s in enumerate(inner_sets) if not s]} hold none of them. Fix: make every "
                            "island hold whole replicas of the model")
        inner = [group(s) for s in inner_sets]
        cross_ranks = tuple(sorted(s[0] for s in inner_sets))
        cross = group(cross_ranks)
        if holders in mine:
            names, params = mine[holders]
            k = groups.index
            out.append(Segment(names=names, params=params, inner=inner[k], inner_src=inner_sets[k][0],
                               cross=cross if groups.rank in cross_ranks else None,
                               link=link(cross) if link is not None and cross is not None and groups.rank in cross_ranks
                               else None))
    return out


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


def reduce_in_island(flat: torch.Tensor, groups: IslandGroups) -> None:
    """SUM over the island's ranks, in place (the fast, local all-reduce)."""
    if groups.group is not None:
        dist.all_reduce(flat, group=groups.group)


def reduce_across_islands(flat: torch.Tensor, groups: IslandGroups, link: EmulatedLink | None,
                          compression: str = "none") -> None:
    """SUM of the island leaders' `flat` over the slow link, then broadcast inside each island."""
    reduce_across(flat, cross=groups.leaders, link=link, inner=groups.group, src=groups.leader,
                  compression=compression)


def reduce_across(flat: torch.Tensor, *, cross: dist.ProcessGroup | None, link: EmulatedLink | None,
                  inner: dist.ProcessGroup | None, src: int, compression: str = "none") -> None:
    """SUM of `flat` over `cross` (one member per island; `link` when the slow link is emulated),
    then broadcast from `src` to the rest of `inner` (its island's other holders).

    Only members of `cross` put bytes on the link; the others receive the result over the island's
    fast group. With compression, the payload crosses as bf16/fp16 and is summed in that dtype (two
    to a few islands: the rounding of the sum is that of one cast)."""
    dtype = COMPRESSION_DTYPES[compression]
    if cross is not None:
        payload = flat.to(dtype) if dtype is not None else flat
        if link is not None:
            link.all_reduce(payload)
        else:
            dist.all_reduce(payload, group=cross)
        if payload is not flat:
            flat.copy_(payload)
    if inner is not None:
        dist.broadcast(flat, src=src, group=inner)


def grads_or_zeros(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every parameter's gradient; a rank with no share this step takes part with zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None]


def sync_gradients(params: Sequence[torch.Tensor], groups: IslandGroups, link: EmulatedLink | None = None) -> None:
    """Synchronous data parallel over islands: SUM of the gradients in each island, then over the
    link among the leaders, then back inside each island (hierarchical all-reduce)."""
    grads = grads_or_zeros(params)
    flat = flatten(grads)
    reduce_in_island(flat, groups)
    reduce_across_islands(flat, groups, link)
    unflatten_into(flat, grads)


class DiLoCo:
    """The outer loop: call `sync_inner_grads()` after each backward and `after_inner_step()` after
    each inner optimizer step; every `inner_steps` calls it runs the outer step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, groups: IslandGroups, global_samples: int,
                 share_fn: Callable[[], int], inner_steps: int, outer_lr: float = 0.7,
                 outer_momentum: float = 0.5, compression: str = "none", link: EmulatedLink | None = None,
                 segments: Sequence[Segment] | None = None, counts_samples: bool = True):
        """global_samples: samples per step over all islands (the plan's global batch);
        share_fn: this rank's samples this step (read every step: shares may be rebalanced);
        inner_steps: H, the same for every island. segments: how this rank's parameters are held
        (make_segments; default: `params` is the whole model, held by every rank of the island);
        counts_samples: this rank adds its share to the island's sample count (one rank per
        replica: a pipeline's stages all see the same samples)."""
        if compression not in COMPRESSION_DTYPES:
            raise PlanError(f"sync.compression is {compression!r}. Fix: use one of {sorted(COMPRESSION_DTYPES)}")
        if inner_steps < 1:
            raise PlanError(f"sync.outer_every is {inner_steps}. Fix: use 1 or more inner steps per outer step")
        if segments is None:
            whole: list[torch.Tensor] = list(params)
            segments = [Segment(names=[str(i) for i in range(len(whole))], params=whole, inner=groups.group,
                                inner_src=groups.leader, cross=groups.leaders, link=link)]
        self.segments = list(segments)
        self.params = [p for seg in self.segments for p in seg.params]
        self.names = [n for seg in self.segments for n in seg.names]
        self.groups = groups
        self.global_samples = global_samples
        self.share_fn = share_fn
        self.counts_samples = counts_samples
        self.inner_steps = inner_steps
        self.compression = compression
        # The global parameters live apart from the model: inner steps move the model, the outer
        # optimizer moves only these.
        self.global_params = [p.detach().clone() for p in self.params]
        self.outer_opt = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                         nesterov=outer_momentum > 0)
        self.steps_done = 0
        self.round_samples = 0.0
        self.outer_steps = 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The outer state, as tensors for torch.distributed.checkpoint: the last synchronised weights,
        the outer momentum, and where the round stands. Keys shared by every island (`outer`) hold the
        same values on every rank; `island{k}` holds what only island k knows (its round's samples).
        A fresh copy: pass it back to `load_state_dict` after DCP filled it."""
        buffers = []
        for g in self.global_params:
            buf = self.outer_opt.state.get(g, {}).get("momentum_buffer")
            # No buffer before the first outer step: zeros then act the same (SGD's first step sets
            # buf = grad, and 0 * momentum + grad is grad).
            buffers.append(torch.zeros_like(g) if buf is None else buf.detach().clone())
        outer = {"global": {n: g.detach().clone() for n, g in zip(self.names, self.global_params, strict=True)},
                 "momentum": dict(zip(self.names, buffers, strict=True)),
                 "counters": torch.tensor([self.steps_done, self.outer_steps], dtype=torch.int64)}
        island = {"round_samples": torch.tensor([self.round_samples], dtype=torch.float64)}
        return {"outer": outer, f"island{self.groups.index}": island}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        outer = sd["outer"]
        for n, g in zip(self.names, self.global_params, strict=True):
            g.copy_(outer["global"][n])
            self.outer_opt.state[g]["momentum_buffer"] = outer["momentum"][n].clone()
        self.steps_done, self.outer_steps = (int(x) for x in outer["counters"].tolist())
        self.round_samples = float(sd[f"island{self.groups.index}"]["round_samples"][0])

    def sync_inner_grads(self) -> None:
        """Island mean gradient on every rank of the island (no traffic on the slow link).

        chipfuse divides each rank's summed loss by the GLOBAL token count, so the island SUM is
        (island samples / global samples) x the island's mean gradient: that factor is undone here.
        The island's sample count is summed over the island each step, so rebalanced shares are
        followed (with one segment it rides in the gradients' all-reduce)."""
        share = float(self.share_fn()) if self.counts_samples else 0.0
        # The whole model in one segment over the island: the count rides in the gradients' all-reduce.
        ride = len(self.segments) == 1 and self.segments[0].inner is self.groups.group
        island_samples = share if ride else self._island_samples(share)
        for seg in self.segments:
            grads = grads_or_zeros(seg.params)
            flat = flatten(grads)
            if ride:
                flat = torch.cat([flat, torch.tensor([share], dtype=flat.dtype)])
            if seg.inner is not None:
                dist.all_reduce(flat, group=seg.inner)
            if ride:
                island_samples, flat = float(flat[-1]), flat[:-1]
            if island_samples > 0:
                flat.mul_(self.global_samples / island_samples)
            unflatten_into(flat, grads)
        self.round_samples += island_samples

    def _island_samples(self, share: float) -> float:
        t = torch.tensor([share], dtype=torch.float64)
        reduce_in_island(t, self.groups)
        return float(t.item())

    def after_inner_step(self) -> bool:
        """Count an inner step; run the outer step when the round is over. True if it ran."""
        self.steps_done += 1
        if self.steps_done < self.inner_steps:
            return False
        self.outer_step()
        return True

    def finish(self) -> None:
        """End of training: an outer step for a round cut short, so every island ends on the
        same global parameters."""
        if self.steps_done:
            self.outer_step()

    @torch.no_grad()
    def outer_step(self) -> None:
        # Pseudo-gradient weighted by the island's share of the round's tokens, so that the SUM
        # across islands is the token-weighted mean (every island took steps_done inner steps).
        weight = self.round_samples / (self.global_samples * self.steps_done) if self.steps_done else 0.0
        i = 0
        for seg in self.segments:
            glob = self.global_params[i: i + len(seg.params)]
            i += len(seg.params)
            delta = (flatten(glob) - flatten(seg.params)).mul_(weight)
            reduce_across(delta, cross=seg.cross, link=seg.link, inner=seg.inner, src=seg.inner_src,
                          compression=self.compression)
            offset = 0
            for g in glob:
                g.grad = delta[offset: offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        self.outer_opt.step()
        for p, g in zip(self.params, self.global_params, strict=True):
            p.copy_(g)
            g.grad = None
        self.steps_done = 0
        self.round_samples = 0.0
        self.outer_steps += 1
