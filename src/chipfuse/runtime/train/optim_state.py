"""The optimizer a plan asks for: AdamW with fp32, bf16, 8-bit or 4-bit state (torchao).

`plan.optimizer_dtype` picks the state format:

- fp32: torch.optim.AdamW (8 bytes of state per parameter).
- bf16: torchao's AdamW with its two moments kept in bf16 (4 bytes per parameter); the update
  itself is computed in fp32 on the fp32 master weights.
- int8 / int4: torchao.optim.AdamW8bit / AdamW4bit, block-wise quantised moments with a scale
  per block (about 2 / 1 bytes per parameter). Following bitsandbytes, torchao quantises only
  tensors of at least 4096 values; smaller ones (biases, norms) keep fp32 state.

On devices with their own memory and `offload="optimizer"`, the state and the update move to host
memory with torchao's CPUOffloadOptimizer (ZeRO-Offload's idea). On a CPU worker there is no
other memory to move to; runtime.parallel.memory decides what that means.

torchao compiles its per-parameter update with torch.compile. On CPU workers that costs 10-30 s
per process and gains nothing (docs/emulation.md, "Facts measured on CPU"), so there we run torchao's own
update function `single_param_adam` eagerly: same maths, same state tensors, no compile.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from chipfuse.runtime.emulate.device import plain_parts as leaf_tensors

LOW_BIT = ("bf16", "int8", "int4")


def _torchao_optim():  # imported lazily: torchao is an optional dependency (pip install chipfuse[ao])
    import logging
    import warnings

    # torchao announces at import each optional CUDA kernel it cannot load; none is used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    try:
        import torchao.optim as ao_optim
        from torchao.optim.adam import _AdamBase, single_param_adam
    except ImportError as e:  # pragma: no cover - depends on the environment
        from chipfuse.errors import ChipfuseError

        raise ChipfuseError("optimizer_dtype int8/int4/bf16 needs torchao. Fix: pip install 'chipfuse[ao]' "
                            "or set optimizer_dtype = fp32 in the plan") from e
    return ao_optim, _AdamBase, single_param_adam


def _eager_step(opt: torch.optim.Optimizer, single_param_adam) -> None:
    """torchao's update loop, calling its `single_param_adam` without torch.compile."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = opt._new_buffer(p, True)  # type: ignore[attr-defined]
                state["exp_avg_sq"] = opt._new_buffer(p, False)  # type: ignore[attr-defined]
            state["step"] += 1
            beta1, beta2 = group["betas"]
            single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                              group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
                              True, False)


def _make_class(optimizer_dtype: str, eager: bool) -> type:
    ao_optim, _AdamBase, single_param_adam = _torchao_optim()
    if optimizer_dtype == "int8":
        base = ao_optim.AdamW8bit
    elif optimizer_dtype == "int4":
        base = ao_optim.AdamW4bit
    else:
        class AdamWBf16State(_AdamBase):  # type: ignore[valid-type, misc]
            """torchao's AdamW whose moments are bf16 tensors (the fp32 master weights stay)."""

            def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
                super().__init__(params, lr, betas, eps, weight_decay, False, block_size=1,
                                 bf16_stochastic_round=False, is_adamw=True)

            @staticmethod
            def _subclass_zeros(p: Tensor, signed: bool, block_size: int) -> Tensor:
                return torch.zeros_like(p, dtype=torch.bfloat16)

        base = AdamWBf16State
    if not eager:
        return base

    class Eager(base):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            _eager_step(self, single_param_adam)
            return loss

    Eager.__name__ = f"Eager{base.__name__}"
    return Eager


def build_state_optimizer(params: Iterable[torch.nn.Parameter], *, optimizer_dtype: str = "fp32", lr: float = 1e-3,
                          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), offload: bool = False,
                          device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW with the state format of `optimizer_dtype`; `offload` moves state to host memory
    (only meaningful where `device` has its own memory: callers decide that, see runtime.parallel.memory).
    betas default to runtime.train.optim's, so that fp32 here is the trainer's optimizer."""
    params = list(params)
    dev = device or (params[0].device if params else torch.device("cpu"))
    kw: dict = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    from chipfuse.runtime.train.recipe import decay_groups

    # With decay, matrices decay and 1-D tensors (biases, norms) do not, as runtime.train.optim.
    groups: list = decay_groups(params, weight_decay) if weight_decay else params
    if offload and dev.type != "cpu":
        ao_optim, _, _ = _torchao_optim()
        cls = torch.optim.AdamW if optimizer_dtype == "fp32" else _make_class(optimizer_dtype, eager=False)
        return ao_optim.CPUOffloadOptimizer(groups, optimizer_class=cls, **kw)
    if optimizer_dtype == "fp32":
        return torch.optim.AdamW(groups, foreach=False, **kw)  # foreach=False: as runtime.train.optim, see there
    return _make_class(optimizer_dtype, eager=dev.type == "cpu")(groups, **kw)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors that hold the optimizer's state, quantised ones as their parts (codes, scales),
    DTensor shards as their local part: what the optimizer really keeps in memory."""
    out: list[Tensor] = []
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                out.extend(leaf_tensors(v))
    return out
