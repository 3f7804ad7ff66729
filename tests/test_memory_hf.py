"""The memory model's saved activations of a Hugging Face stage (plan.memory.hf_stage_saved_bytes,
coefficients in each family's row, model/families/) against what the emulated meter counts for transformers' own layers.

For every architecture chipfuse splits, a tiny model's first, middle and last stage runs forward and
backward (its loss on the last stage) under runtime.emulate.device.MemoryMeter, the meter the emulated
devices refuse with; the meter's peak of saved bytes must equal the model's figure, in fp32 and in
bf16 under autocast as the runtime applies it (runtime.parallel.memory.apply_autocast: fp32 master weights,
some saved tensors stay fp32). One process, no workers: each case is a few milliseconds of compute.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from chipfuse.model.build import build_full, build_stage
from chipfuse.model.configs import spec_from_config_dict
from chipfuse.model.gpt import loss_sum
from chipfuse.plan.memory import activation_bytes_per_token, hf_stage_saved_bytes
from chipfuse.runtime.emulate.device import MemoryMeter
from chipfuse.runtime.parallel.checkpointing import apply_checkpointing
from chipfuse.runtime.parallel.memory import apply_autocast
from tests.hf_tiny import TINY

T = 32  # longer than the tiny configs' sliding windows (16), so windowed layers get their mask
LAYERS = 4
# Stages of the 4-layer model: layers 0-1 (first), 2 (middle), 3 (last).
SPLIT = {"first": range(0, 2), "middle": range(2, 3), "last": range(3, 4)}
_GEMMA = {**{k: v for k, v in TINY["llama"].items() if k != "model_type"}, "model_type": "gemma", "head_dim": 16}
CONFIGS = {
    **TINY, "gemma": _GEMMA,
    # Gemma 3 with both layer types in the first stage: two rotary sets, a windowed and a full layer.
    "gemma3_text": {**TINY["gemma3_text"], "layer_types": ["sliding_attention", "full_attention"] * 2},
    # The configs' default dropout (0.1 everywhere): masks kept, GPT-2's attention on SDPA's math path.
    "gpt2+dropout": {k: v for k, v in TINY["gpt2"].items() if "pdrop" not in k},
    "opt+dropout": {**TINY["opt"], "dropout": 0.1},
}


def _spec(name: str):
    raw = dict(CONFIGS[name])
    raw["n_layer" if raw["model_type"] == "gpt2" else "num_hidden_layers"] = LAYERS
    return spec_from_config_dict(raw, name=name, source=f"<{name}>")


@functools.cache
def _full(name: str):
    """The whole model, built once per architecture; stages are cut from it (their own layer dicts,
    so checkpointing one stage leaves the others' layers as they are)."""
    return build_full(_spec(name))


def measured_bytes(name: str, where: str, checkpoint: str, dtype: str = "fp32", sequences: int = 1) -> int:
    """Peak bytes the meter counts as saved for backward (parameters excluded, as set_static does)."""
    torch.set_num_threads(1)  # as every worker does: on a shared 2-core machine more threads only contend
    torch.manual_seed(0)
    spec = _spec(name)
    stages = tuple(types.SimpleNamespace(layers=r, checkpoint=checkpoint) for r in SPLIT.values())
    index = list(SPLIT).index(where)
    mod = build_stage(spec, stages, index, full=_full(name))
    mod.train()
    apply_checkpointing(mod, checkpoint)
    apply_autocast(mod, dtype)  # the runtime's order: checkpointing, then autocast around forward
    meter = MemoryMeter(device_name="d", cap_bytes=None)
    meter.set_static(list(mod.parameters()))
    x = (torch.randint(3, 256, (sequences, T)) if where == "first"
         else torch.randn(sequences, T, spec.dim, requires_grad=True))
    with meter.track():
        out = mod(x)
        loss = loss_sum(out, torch.randint(3, 256, (sequences, T))) if where == "last" else out.float().sum()
        # Backward only frees saved tensors, except under checkpointing, where it rebuilds blocks: run
        # it there (the meter must not see the rebuilt block, which the model adds apart); without
        # checkpointing the peak is the count at the end of forward, and skipping backward halves the time.
        if checkpoint != "none":
            loss.backward()
    return meter.peak_bytes - meter.static_bytes


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpoint", ["none", "full"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_activations_match_the_meter(name: str, checkpoint: str, dtype: str) -> None:
    spec = _spec(name)
    for where, layers in SPLIT.items():
        visible, rebuilt = hf_stage_saved_bytes(spec, layers, checkpoint, first=where == "first",
                                                last=where == "last", seq_len=T, dtype=dtype)
        got = measured_bytes(name, where, checkpoint, dtype)
        # Exact: every tensor is counted, at one sequence per micro-batch (the per-sequence terms, rotary
        # cos/sin and norm weights, are exact there); 1 byte of slack for float rounding of the sum.
        assert abs(visible * T - got) <= 1, (name, where, checkpoint, visible * T, got)
        # The planner's figure adds the block a real chip rebuilds in backward (the meter does not see it).
        total = activation_bytes_per_token(spec, len(layers), checkpoint, first=where == "first",
                                           last=where == "last", seq_len=T, first_layer=layers.start, dtype=dtype)
        assert total == pytest.approx(visible + rebuilt)
        assert (rebuilt > 0) == (checkpoint != "none")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "gemma2"])
def test_per_micro_batch_tensors_are_shared_by_its_sequences(name: str, dtype: str) -> None:
    """Two sequences per micro-batch: cos/sin, position ids, Gemma's norm weights and bf16 weight copies
    are kept once per micro-batch, everything else per token."""
    spec = _spec(name)
    for where, layers in SPLIT.items():
        visible, _ = hf_stage_saved_bytes(spec, layers, "none", first=where == "first", last=where == "last",
                                          seq_len=T, dtype=dtype, sequences=2)
        got = measured_bytes(name, where, "none", dtype, sequences=2)
        assert abs(visible * 2 * T - got) <= 1, (name, where, dtype, visible * 2 * T, got)


def test_gradients_and_activations_add_up_over_several_micro_batches() -> None:
    """Over several micro-batches a step holds the first ones' gradients while later ones' activations
    live (the trainer's meter counts both: P + O + G + A); one micro-batch holds the larger."""
    from chipfuse.plan.memory import Strategy, stage_device_memory

    spec = _spec("gpt2")
    kw = dict(device="d", capacity_bytes=0, num_layers=2, first=True, last=False, group_size=1, tokens_in_flight=64,
              seq_len=T)
    one = stage_device_memory(spec, Strategy(), **kw)
    many = stage_device_memory(spec, Strategy(), micro_batches=8, **kw)
    assert one.peak_bytes == one.params_bytes + one.optimizer_bytes + max(one.grads_bytes, one.activation_bytes)
    assert many.peak_bytes == pytest.approx(one.params_bytes + one.optimizer_bytes + one.grads_bytes
                                            + one.activation_bytes)
