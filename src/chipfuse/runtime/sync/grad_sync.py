"""The training loop's gradient-sync hook, chosen from the plan and the pool.

- the default (UnitSync): each layer's gradient summed over the replicas that hold it, whatever
  their stage split and group sizes, through vendor groups and a bridge (runtime/sync/groups.py).
- plan.sync.islands empty, an all-emulated pool spanning nodes: the same synchronous step, reduced
  per node then across nodes, with the pool's slowest [[link]] between them emulated (so a slow
  link costs what it would).
- plan.sync.islands set: synchronous inside each island, DiLoCo between islands every
  plan.sync.outer_every steps (runtime.sync.diloco), the cross-island link emulated as above.

Only trainable parameters travel: the trainer hands in the worker's trainable ones and the worker's
units list no frozen parameter (model.converters), so a frozen one costs no bytes on any link. A
trainable parameter without a gradient on a rank (its micro-batches touched nothing) still sends
zeros, so every rank's buffers have one layout.

The trainer calls reduce() where it reduced gradients, after_step() after optimizer.step(), and
finish() after the last step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from chipfuse.cluster.pool import Pool
from chipfuse.plan.islands import island_layout, slowest_link
from chipfuse.plan.plan import Plan
from chipfuse.runtime.emulate.links import EmulatedLink, LinkStats
from chipfuse.runtime.parallel.topology import units_of_model
from chipfuse.runtime.sync.data_parallel import all_reduce_gradients
from chipfuse.runtime.sync.diloco import (
    DiLoCo,
    IslandGroups,
    make_island_groups,
    make_segments,
    sync_gradients,
)


class GradientSync:
    """Synchronous data parallel: one flat SUM all-reduce of the gradients per step."""

    link: EmulatedLink | None = None

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)

    def reduce(self) -> None:
        all_reduce_gradients(self.params)

    def after_step(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict:
        """State a checkpoint must keep beyond the model and optimizer (none for synchronous sync)."""
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    @property
    def replica_key(self) -> str | None:
        """When replicas hold different weights between syncs (islands), the checkpoint key under
        which this rank's own model and optimizer go; None when every replica holds the same."""
        return None

    def merged(self, per_rank: list[dict]) -> dict:
        """describe() of every rank (in rank order), as the run's summary reports it."""
        return per_rank[0]

    def describe(self) -> dict:
        out: dict = {"mode": "sync"}
        if self.link is not None:
            out["link"] = {"bandwidth_bytes_s": self.link.bandwidth_bytes_s, "latency_s": self.link.latency_s,
                           "emulated": True, **self.link.stats.to_dict()}
        return out


class UnitSync(GradientSync):
    """Sum each unit's (embedding, block, head, tied matrix) gradient over the stage groups holding it.

    A unit held by a stage group of several devices has its gradient spread over the group: DTensor
    shards (tensor parallel, FSDP2) are gathered whole inside the group first, and only the group's
    leader adds it to the sum (the others add zeros), so a replica counts once whatever its group
    size; each member then keeps its own shard of the sum. Units with the same set of holding ranks
    travel in one flat buffer."""

    def __init__(self, worker: Any):
        super().__init__([p for ps in worker.unit_params.values() for p in ps])
        self.worker = worker
        self.sent_bytes = 0
        """Gradient bytes this rank has handed to its reducers (trainable parameters only)."""

    def reduce(self) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        w = self.worker
        lead = w.role.leader
        for ranks, reducer in w.groups.reducers.items():
            params = [p for u in units_of_model(w.plan.model) if w.unit_ranks[u] == ranks for p in w.unit_params.get(u, [])]
            whole = []
            for p in params:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if isinstance(g, DTensor):
                    g = g.full_tensor()
                whole.append(g if lead else torch.zeros_like(g))
            if not whole:
                continue
            flat = _flatten_dense_tensors(whole)
            self.sent_bytes += flat.numel() * flat.element_size()
            reducer.all_reduce(flat)
            for p, g in zip(params, _unflatten_dense_tensors(flat, whole), strict=True):
                if isinstance(p, DTensor):
                    p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                else:
                    p.grad = g

    def describe(self) -> dict:
        return {"mode": "sync", "sent_bytes": self.sent_bytes,
                "reducers": [r.describe() for r in self.worker.groups.reducers.values()]}


class HierarchicalSync(GradientSync):
    """Synchronous, reduced inside each group then over the (emulated) link between groups."""

    def __init__(self, params: Sequence[torch.nn.Parameter], groups: IslandGroups, link: EmulatedLink | None):
        super().__init__(params)
        self.groups = groups
        self.link = link

    def reduce(self) -> None:
        sync_gradients(self.params, self.groups, self.link)

    def describe(self) -> dict:
        return {**super().describe(), "groups": [list(i) for i in self.groups.islands]}


class IslandSync(HierarchicalSync):
    """Synchronous inside islands, DiLoCo between them."""

    def __init__(self, params: Sequence[torch.nn.Parameter], groups: IslandGroups, link: EmulatedLink | None,
                 diloco: DiLoCo):
        super().__init__(params, groups, link)
        self.diloco = diloco

    def reduce(self) -> None:
        self.diloco.sync_inner_grads()

    def after_step(self) -> None:
        self.diloco.after_inner_step()

    def finish(self) -> None:
        self.diloco.finish()

    def state_dict(self) -> dict:
        return self.diloco.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.diloco.load_state_dict(sd)

    @property
    def replica_key(self) -> str | None:
        return f"island{self.groups.index}"

    def describe(self) -> dict:
        return {**super().describe(), "mode": "islands", "outer_every": self.diloco.inner_steps,
                "outer_steps": self.diloco.outer_steps, "compression": self.diloco.compression}

    def merged(self, per_rank: list[dict]) -> dict:
        """describe() of every rank, as one: what island 0 put on the slow link, over all of its
        ranks (a pipeline's stages each send their own layers)."""
        out = dict(per_rank[0])
        links = [per_rank[r]["link"] for r in self.groups.islands[0] if "link" in per_rank[r]]
        if links:
            out["link"] = {**links[0], **LinkStats.summed(links).to_dict()}
        return out


def _link_between(pool: Pool, islands: Sequence[Sequence[str]], groups: IslandGroups) -> EmulatedLink | None:
    """The emulated link joining the islands' leaders: the pool's slowest link between islands.
    Only an all-emulated pool on one host is padded: real devices, and workers on several hosts,
    pay their real network (and the padding needs one clock for every rank)."""
    make = _link_maker(pool, islands, groups)
    return make(groups.leaders) if make is not None and groups.leaders is not None else None


def _link_maker(pool: Pool, islands: Sequence[Sequence[str]], groups: IslandGroups
                ) -> Callable[[Any], EmulatedLink] | None:
    """Links over the pool's slowest link between islands for any group that crosses it, all
    counted in one set of statistics (they share the physical link); None when not emulated."""
    world = sum(len(i) for i in groups.islands)
    one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    if len(islands) < 2 or not one_host or not all(d.emulated for d in pool.devices):
        return None
    nodes = [sorted({pool.device(d).node for d in isl}) for isl in islands]
    ln = min((slowest_link(pool, a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:]),
             key=lambda x: (x.bandwidth, -x.latency_s))
    stats = LinkStats()

    def make(group: Any) -> EmulatedLink:
        link = EmulatedLink(bandwidth_bytes_s=ln.bandwidth, latency_s=ln.latency_s, group=group)
        link.stats = stats
        return link
    return make


def build_gradient_sync(plan: Plan, pool: Pool, params: Sequence[torch.nn.Parameter], *, rank: int,
                        rank_devices: Sequence[str], share_fn: Callable[[], int],
                        default: GradientSync | None = None, worker: Any = None) -> GradientSync:
    """params: the trainable parameters; rank_devices: the device name of every rank, in rank order; share_fn: this rank's samples
    in the current step; default: the sync of a plan without islands on one node (the worker's
    UnitSync; a flat all-reduce when None); worker: the PipelineWorker, whose units (which ranks
    hold which layers) let islands hold pipelines; without it `params` is the whole model on every
    rank. Every rank must call this at the same point: it creates process groups."""
    world_size = len(rank_devices)

    def ranks(groups: Sequence[Sequence[str]]) -> list[list[int]]:
        return [[list(rank_devices).index(d) for d in g] for g in groups]

    if plan.sync.islands:
        islands = island_layout(plan)
        groups = make_island_groups(ranks(islands), rank=rank, world_size=world_size)
        make_link = _link_maker(pool, islands, groups)
        segments, counts = None, True
        if worker is not None:
            segments = make_segments(*_unit_holders(worker), groups, link=make_link)
            counts = worker.role.first and worker.role.leader
            # Every segment's link shares one set of statistics: any of them reports for this rank.
            link = next((seg.link for seg in segments if seg.link is not None), None)
        else:
            link = make_link(groups.leaders) if make_link is not None and groups.leaders is not None else None
        s = plan.sync
        diloco = DiLoCo(params, groups=groups, global_samples=plan.global_batch, share_fn=share_fn,
                        inner_steps=s.outer_every, outer_lr=s.outer_lr, outer_momentum=s.outer_momentum,
                        compression=s.compression, link=link, segments=segments, counts_samples=counts)
        return IslandSync(list(params) if worker is None else worker.trainable, groups, link, diloco)
    nodes: dict[str, list[str]] = {}
    for d in rank_devices:
        nodes.setdefault(pool.device(d).node, []).append(d)
    if world_size > 1 and len(nodes) > 1 and plan.is_pure_data_parallel and all(d.emulated for d in pool.devices):
        by_node = list(nodes.values())
        groups = make_island_groups(ranks(by_node), rank=rank, world_size=world_size)
        return HierarchicalSync(params, groups, _link_between(pool, by_node, groups))
    return default or GradientSync(params)


def _unit_holders(worker: Any) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], tuple[list[str], list[Any]]]]:
    """Every set of ranks that hold the same units (the same on every rank) and, for the sets this
    rank is in, the names and tensors of its parameters in them."""
    from chipfuse.runtime.parallel.checkpointing import clean_name

    name_of = {id(p): clean_name(n) for n, p in worker.module.named_parameters() if p.requires_grad}
    holder_sets = sorted(set(worker.unit_ranks.values()))
    mine: dict[tuple[int, ...], tuple[list[str], list[Any]]] = {}
    for u in units_of_model(worker.plan.model):
        ps = worker.unit_params.get(u, [])
        if ps:
            names, params = mine.setdefault(worker.unit_ranks[u], ([], []))
            names.extend(name_of[id(p)] for p in ps)
            params.extend(ps)
    held = sum(len(ps) for _, ps in mine.values())
    if held != len(name_of):  # every trainable tensor in exactly one unit, or an island would drift apart
        raise RuntimeError(f"units hold {held} of the stage's {len(name_of)} trainable parameters")
    return holder_sets, mine
