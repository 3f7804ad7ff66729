"""The model-family registry: a family declared and registered from this file alone is planned,
built stage by stage and trained; no family branch lives outside model/families and the registry;
model/ has no import circle."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import ChipfuseError
from chipfuse.model.build import build_full, build_stage, full_logits
from chipfuse.model.family import Family, Numels
from chipfuse.model.gpt import loss_sum
from chipfuse.model.init import materialise, no_init
from chipfuse.model.registry import family_of, register, tp_refusal, unregister
from chipfuse.model.spec import ModelSpec
from chipfuse.model.split import EMBED_UNIT, HEAD_UNIT, StageModule, block_unit, param_count
from chipfuse.plan.memory import tensor_numels
from chipfuse.plan.search import search

SRC = Path(__file__).resolve().parents[1] / "src" / "chipfuse"


# ------------------------------------------------------------------------------ a toy family
class ToyBlock(nn.Module):
    """A residual MLP: no attention, nothing any built-in family has."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.up = nn.Linear(spec.dim, spec.ffn)
        self.down = nn.Linear(spec.ffn, spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.emb = nn.Embedding(spec.vocab_size, spec.dim)
        self.blocks = nn.ModuleList(ToyBlock(spec) for _ in range(spec.num_layers))
        self.head = nn.Linear(spec.dim, spec.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class ToyStage(StageModule):
    emb: Any
    blocks: Any
    head: Any

    def __init__(self, full: ToyLM, stage: Any, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode, self.tied = first, last, stage.checkpoint, {}
        if first:
            self.emb = full.emb
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in stage.layers})
        if last:
            self.head = full.head

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) if self.first else x

    def body(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks.values():
            h = self._run_block(b, h)
        return self.head(h) if self.last else h

    def _unit_of(self, name: str) -> str:
        top = name.split(".")[0]
        return EMBED_UNIT if top == "emb" else HEAD_UNIT if top == "head" else block_unit(int(name.split(".")[1]))


def toy_init(name: str, m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def toy_build_full(spec: ModelSpec, seed: int) -> nn.Module:
    with torch.device("meta"), no_init():
        model = ToyLM(spec)
    materialise(model, toy_init, seed)
    return model


def toy_build_stage(spec: ModelSpec, stage: Any, *, first: bool, last: bool, seed: int, full: nn.Module | None,
                    device: Any) -> StageModule:
    if full is not None:
        return ToyStage(full, stage, first=first, last=last)  # type: ignore[arg-type]
    with torch.device("meta"), no_init():
        meta = ToyLM(spec)
    mod = ToyStage(meta, stage, first=first, last=last)
    materialise(mod, toy_init, seed, device=device)
    return mod


def toy_numels(spec: ModelSpec) -> Numels:
    h, f, V = spec.dim, spec.ffn, spec.vocab_size
    return [f * h, f, h * f, h], [V * h], [V * h]


TOY = Family(
    name="toy", runtime=types.SimpleNamespace(build_full=toy_build_full, build_stage=toy_build_stage),
    arch_defaults=lambda spec: {"norm": "layernorm", "qkv_bias": False, "out_bias": False, "mlp_bias": True,
                                "gated_mlp": False, "position_rows": 0},
    default_ffn=lambda dim: 2 * dim, tensor_numels=toy_numels, no_tp="the toy's blocks have no plan")


@dataclass(frozen=True)
class Part:
    """What a stage builder reads of a plan's Stage."""

    layers: range
    checkpoint: str = "none"


@pytest.fixture
def toy():
    register(TOY)
    yield ModelSpec(name="toy-lm", family="toy", num_layers=4, dim=32, num_heads=4, vocab_size=64, seq_len=16)
    unregister(TOY)


def test_a_toy_family_registered_here_is_priced_planned_and_refused_tensor_parallel(toy):
    assert family_of(toy) is TOY
    assert toy.ffn == 64 and toy.arch().norm == "layernorm" and toy.arch().position_rows == 0  # its own defaults
    # The family's tensor table (what plan.memory prices) is its module's parameters, tensor by tensor.
    block, embed, head = tensor_numels(toy)
    model = toy_build_full(toy, 0)
    assert toy.num_layers * sum(block) + sum(embed) + sum(head) == param_count(model)
    assert tp_refusal(toy) == "family 'toy': the toy's blocks have no plan"
    pool = pool_from_dict({"name": "two", "node": [{"name": "n0", "device": [
        {"name": "a", "chip": "A100", "memory_gib": 80}, {"name": "b", "chip": "T4", "memory_gib": 16}]}]})
    res = search(pool, toy, global_batch=8, seq_len=16, time_budget_s=1.0)
    for rep in res.plan.replicas:
        assert [i for st in rep.stages for i in st.layers] == list(range(toy.num_layers))
        assert all(st.tp_degree == 1 for st in rep.stages)  # its refusal keeps tensor parallel out


def test_a_toy_family_builds_stages_alone_and_trains_a_step_like_its_whole_model(toy):
    idx = torch.randint(0, toy.vocab_size, (2, toy.seq_len), generator=torch.Generator().manual_seed(0))
    full = build_full(toy, seed=3)
    parts = (Part(range(0, 1)), Part(range(1, 4)))
    stages = [build_stage(toy, parts, i, seed=3) for i in range(2)]  # each materialised alone
    assert stages[0].units().keys() == {EMBED_UNIT, block_unit(0)}
    assert stages[1].units().keys() == {block_unit(1), block_unit(2), block_unit(3), HEAD_UNIT}
    # Same seed, same weights by name: the stages run the whole model's numbers exactly.
    targets = torch.roll(idx, -1, dims=1)
    ref = loss_sum(full_logits(full, idx), targets)
    loss = loss_sum(stages[1](stages[0](idx)), targets)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    ref.backward()
    loss.backward()
    grads = {n: p.grad for st in stages for n, p in st.named_parameters()}
    for n, p in full.named_parameters():  # the stages keep the whole model's names
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)
    opt = torch.optim.SGD([p for st in stages for p in st.parameters()], lr=1.0)
    opt.step()
    with torch.no_grad():
        assert loss_sum(stages[1](stages[0](idx)), targets) < loss


def test_unknown_families_and_taken_names_are_refused(toy):
    with pytest.raises(ChipfuseError, match=r"family 'nope'.*no registered family\. Fix: use one of .*toy"):
        family_of(ModelSpec(name="x", family="nope", num_layers=1, dim=8, num_heads=1, vocab_size=8, seq_len=4))
    with pytest.raises(ValueError, match="already registered"):
        register(TOY)


def test_builtin_families_keep_their_rows():
    gpt = ModelSpec(name="g", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
    assert family_of(gpt).tp is not None and not family_of(gpt).ties_embeddings
    assert gpt.ffn == 256 and gpt.arch().norm == "layernorm" and gpt.arch().position_rows == 32
    llama = ModelSpec(name="l", family="llama", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
    assert llama.ffn == 256 and llama.arch().gated_mlp and llama.arch().position_rows == 0
    assert family_of(llama).layout is not None and family_of(llama).hf_weights


# ------------------------------------------------------------------------------ no family branches
BRANCH = re.compile(r"""\b(family|model_type)\s*(==|!=|\bnot\s+in\b|\bin\b)\s*[("'\[{A-Z]""")
ALLOWED = (SRC / "model" / "families", SRC / "model" / "registry.py")


def test_no_family_branch_outside_the_registry():
    found = []
    for path in SRC.rglob("*.py"):
        if any(path == a or a in path.parents for a in ALLOWED):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if BRANCH.search(code):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not found, "family branches outside model/families and model/registry.py:\n" + "\n".join(found)


def test_the_branch_pattern_sees_the_usual_forms():
    for code in ('if spec.family == "gpt":', "if spec.model_type in ('gpt2', 'opt'):", 'x = spec.family != "hf"',
                 "if spec.family not in FAMILIES:"):
        assert BRANCH.search(code), code
    assert not BRANCH.search('raise ChipfuseError(f"model_type {mt!r} is refused")')
