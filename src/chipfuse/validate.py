"""Input checked by type and range before use, from the dataclasses that describe it.

`build(cls, raw, source=..., where=...)` turns parsed JSON/TOML into an instance of the frozen
dataclass `cls`, or raises ONE line naming the file, the field, what was found and the fix. The
rules come from the field types (int, float, str, bool, Literal, X | None, tuple[...], dict[str,
...], nested dataclasses, Any) and from range metadata attached with `Annotated[int, Range(...)]`
(or a `limits` table for a dataclass whose module is not ours to annotate):

- int: a whole number, never a bool, in [0, 2**31) unless a Range says otherwise; float: a
  number, never NaN or inf, in [0, 1e21] unless a Range says otherwise. Absurd sizes therefore
  stop here, before anything loops over them.
- str: a non-empty string, unless the field's default is "" (a description that may be blank).
- missing required keys and unknown keys are refused (unknown keys: a misspelt field must not be
  ignored silently), except for `open=True` (files the program writes and may extend, such as a
  checkpoint manifest).

Kept to the handful of types chipfuse's inputs use; pydantic would do the same with a compiled
dependency and messages spread over several lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from chipfuse.errors import ChipfuseError

T = TypeVar("T")

INT_MAX = 2**31 - 1
FLOAT_MAX = 1e21
MAX_ITEMS = 100_000
"""Longest list or table accepted anywhere (a plan or pool this long is a mistake, not a job)."""


@dataclass(frozen=True)
class Range:
    """Closed range [lo, hi] for a number; `above` makes lo exclusive (a positive float)."""

    lo: float = 0
    hi: float = INT_MAX
    above: bool = False

    def holds(self, v: float) -> bool:
        return (v > self.lo if self.above else v >= self.lo) and v <= self.hi

    def text(self) -> str:
        return f"{'above' if self.above else 'at least'} {self.lo:g} and at most {self.hi:g}"


# Common ranges, named so the dataclasses read as a schema.
Count = typing.Annotated[int, Range(1, 1 << 20)]
"""A count of things (samples, layers, devices, steps): 1 .. 1M."""
Index = typing.Annotated[int, Range(0, 1 << 20)]
Positive = typing.Annotated[float, Range(0, FLOAT_MAX, above=True)]
Fraction = typing.Annotated[float, Range(0, 1)]


# Ranges for dataclasses whose modules are not annotated here, keyed by class name: a value is a
# Range (numbers) or a tuple of the strings allowed.
LIMITS: dict[str, dict[str, Range | tuple[str, ...]]] = {
    "ModelSpec": {
        "family": ("gpt", "llama", "hf"),
        "num_layers": Range(1, 4096), "dim": Range(1, 1 << 17), "num_heads": Range(1, 4096),
        "num_kv_heads": Range(1, 4096), "ffn_dim": Range(1, 1 << 20), "vocab_size": Range(1, 1 << 24),
        "seq_len": Range(1, 1 << 20),
    },
}


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _leaf(where: str) -> str:
    return re.sub(r"\[\d+\]$", "", where.rsplit(".", 1)[-1])


def _kind(tp: Any, where: str = "") -> str:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _kind(get_args(tp)[0], where)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a, where) for a in get_args(tp) if a is not type(None))
    args = get_args(tp)
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        toml = re.sub(r"\[\d+\]", "", where)
        return f"a list of tables, `[[{toml}]]` in TOML" if toml else "a list of tables"
    if tp is int:
        return "a whole number"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    if origin in (tuple, list):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table/object"
    return str(tp)


class _Checker:
    def __init__(self, source: str, error: type[ChipfuseError]):
        self.source, self.error = source, error

    def fail(self, where: str, found: str, fix: str) -> ChipfuseError:
        return self.error(f"{self.source}: {where}: {found}. Fix: {fix}")

    def value(self, tp: Any, v: Any, where: str, *, rng: Range | None = None, may_be_empty: bool = False) -> Any:
        origin = get_origin(tp)
        if origin is typing.Annotated:
            base, *meta = get_args(tp)
            r = next((m for m in meta if isinstance(m, Range)), rng)
            return self.value(base, v, where, rng=rng or r, may_be_empty=may_be_empty)
        if tp is Any:
            return v
        if origin in (typing.Union, types.UnionType):
            opts = get_args(tp)
            if v is None and type(None) in opts:
                return None
            inner = [o for o in opts if o is not type(None)]
            if len(inner) == 1:
                return self.value(inner[0], v, where, rng=rng, may_be_empty=may_be_empty)
            raise TypeError(f"validate: unsupported union {tp}")
        if tp is bool:
            if not isinstance(v, bool):
                raise self.fail(where, f"found {_short(v)}, expected true or false", "write true or false")
            return v
        if tp is int or tp is float:
            return self.number(tp, v, where, rng)
        if tp is str:
            if not isinstance(v, str) or not (v or may_be_empty):
                raise self.fail(where, f"found {_short(v)}, expected a non-empty string", 'write a name in quotes')
            if len(v) > 4096:
                raise self.fail(where, f"a string of {len(v)} characters", "use a shorter one (4096 at most)")
            return v
        if origin is Literal:
            if v not in get_args(tp) or isinstance(v, bool):
                raise self.fail(where, f"found {_short(v)}", f"use one of {list(get_args(tp))}")
            return v
        if origin in (tuple, list):
            return self.sequence(tp, v, where, rng)
        if origin is dict:
            key_tp, val_tp = get_args(tp)
            if not isinstance(v, dict):
                raise self.fail(where, f"found {_short(v)}, expected a table/object", "write a table of name = value")
            self.size(v, where)
            return {self.value(key_tp, k, f"{where}.{k}"): self.value(val_tp, x, f"{where}.{k}", rng=rng)
                    for k, x in v.items()}
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.dataclass(tp, v, where)
        raise TypeError(f"validate: unsupported type {tp!r} at {where}")

    def number(self, tp: type, v: Any, where: str, rng: Range | None) -> int | float:
        if isinstance(v, bool) or not isinstance(v, int | float) or (tp is int and not isinstance(v, int)):
            raise self.fail(where, f"found {_short(v)}, expected {_kind(tp)}",
                            f"write `{_leaf(where)} = <{'whole number' if tp is int else 'number'}>`")
        if isinstance(v, float) and not math.isfinite(v):
            raise self.fail(where, f"found {v}", "write a finite number")
        r = rng or (Range(0, INT_MAX) if tp is int else Range(0, FLOAT_MAX))
        if not r.holds(v):
            raise self.fail(where, f"found {_short(v)}, out of range", f"use a value {r.text()}")
        return int(v) if tp is int else float(v)

    def size(self, v: Any, where: str) -> None:
        if len(v) > MAX_ITEMS:
            raise self.fail(where, f"{len(v)} entries", f"use at most {MAX_ITEMS}")

    def sequence(self, tp: Any, v: Any, where: str, rng: Range | None) -> tuple | list:
        if not isinstance(v, list | tuple):
            raise self.fail(where, f"found {_short(v)}, expected a list", "write a list in [ ]")
        self.size(v, where)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or get_origin(tp) is list:
            items = [self.value(args[0], x, f"{where}[{i}]", rng=rng) for i, x in enumerate(v)]
        else:
            if len(v) != len(args):
                raise self.fail(where, f"{len(v)} entries", f"give exactly {len(args)}")
            items = [self.value(a, x, f"{where}[{i}]", rng=rng) for i, (a, x) in enumerate(zip(args, v, strict=True))]
        return tuple(items) if get_origin(tp) is tuple else items

    def fields(self, cls: type, raw: Any, where: str, *, open: bool = False) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where, f"found {_short(raw)}, expected a table/object", "write a table of name = value")
        hints = typing.get_type_hints(cls, include_extras=True)
        fs = {f.name: f for f in dataclasses.fields(cls) if f.init}
        extra = sorted(set(raw) - set(fs), key=str)
        if extra and not open:
            raise self.fail(f"{where}.{extra[0]}", "unknown field", f"use one of {sorted(fs)}")
        own = LIMITS.get(cls.__name__, {})
        out: dict[str, Any] = {}
        for name, f in fs.items():
            fw = f"{where}.{name}" if where else name
            if name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.fail(fw, "missing", f"add `{name}` ({_kind(hints[name], fw)})")
                continue
            lim = own.get(name)
            out[name] = self.value(hints[name], raw[name], fw, rng=lim if isinstance(lim, Range) else None,
                                   may_be_empty=f.default == "")
            if isinstance(lim, tuple) and out[name] not in lim:
                raise self.fail(fw, f"found {_short(out[name])}", f"use one of {list(lim)}")
        return out

    def dataclass(self, cls: type, raw: Any, where: str, *, open: bool = False) -> Any:
        kwargs = self.fields(cls, raw, where, open=open)
        try:
            return cls(**kwargs)
        except ChipfuseError as e:  # a __post_init__ of the dataclass refused a combination
            raise self.error(f"{self.source}: {where + ': ' if where else ''}{e}") from None


def build(cls: type[T], raw: Any, *, source: str, where: str = "", error: type[ChipfuseError] = ChipfuseError,
          open: bool = False) -> T:
    """`raw` (parsed JSON/TOML) as an instance of dataclass `cls`, or `error` in one line."""
    return _Checker(source, error).dataclass(cls, raw, where, open=open)  # type: ignore[no-any-return]


def fields(cls: type, raw: Any, *, source: str, where: str = "", error: type[ChipfuseError] = ChipfuseError,
           open: bool = False) -> dict[str, Any]:
    """Like `build`, but the checked keyword arguments, for a caller that builds `cls` itself."""
    return _Checker(source, error).fields(cls, raw, where, open=open)


def model_spec(spec: Any, *, source: str, where: str = "model", error: type[ChipfuseError] = ChipfuseError) -> Any:
    """A ModelSpec (or its dict) checked field by field and as a whole: heads divide the width,
    key/value heads divide the heads. Returns the checked ModelSpec."""
    from chipfuse.model.spec import ModelSpec  # model.spec imports nothing from here (model.configs does)

    raw = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) and not isinstance(spec, type) else spec
    m = build(ModelSpec, raw, source=source, where=where, error=error)
    if m.dim % m.num_heads and not m.head_dim:  # an explicit head_dim (Gemma, Qwen3) need not divide the width
        raise error(f"{source}: {where}.num_heads: {m.num_heads} does not divide dim {m.dim}. "
                    "Fix: use a head count that divides the width")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise error(f"{source}: {where}.num_kv_heads: {m.num_kv_heads} does not divide num_heads {m.num_heads}. "
                    "Fix: use a key/value head count that divides the head count")
    return m


def one_line(message: str) -> str:
    """An error message on one line (several reasons joined by '; ')."""
    return "; ".join(s.strip() for s in str(message).splitlines() if s.strip())


# ------------------------------------------------------------------------------------------------
# Command-line values


def arg_int(lo: int, hi: int) -> Callable[[str], int]:
    """argparse `type=` for a whole number in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range; use {lo}..{hi}")
        return v

    parse.__name__ = "int"
    return parse


def arg_float(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """argparse `type=` for a finite number in [lo, hi] (lo excluded with `above`)."""
    r = Range(lo, hi, above=above)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or not r.holds(v):
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a value {r.text()}")
        return v

    parse.__name__ = "float"
    return parse
