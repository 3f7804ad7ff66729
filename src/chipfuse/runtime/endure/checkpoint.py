"""Checkpoints that survive a crash mid-write and a change of pool.

Layout of one checkpoint (N = optimizer steps completed = the next step to train)::

    DIR/step_000123/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (model + optimizer, by FQN)
        rng.json                       every rank's torch / python / numpy RNG state (JSON, no pickle)
        manifest.json                  step, plan, extra, sha256 + size of every file above

Written into `DIR/step_000123.tmp/` and renamed to its final name only after the manifest is on
disk, so a directory without `.tmp` is complete: a crash leaves a `.tmp` that loading ignores.
Loading verifies every checksum and falls back to the newest checkpoint that passes, saying why
it passed over the others.

The model and optimizer go through DCP's `get_state_dict`, which keys every tensor by its
fully-qualified name with wrapper prefixes (DDP's `module.`) removed. In a data-parallel plan
every rank holds the whole model, so the saved layout does not depend on the plan: a checkpoint
written by three ranks loads on two, or in one process; a pipeline stage (whose modules keep the
full model's names) saves and loads just its own part. Only the atomic directory protocol, the
manifest and the fallback are written by hand; the tensor I/O is DCP's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from chipfuse import validate
from chipfuse.errors import ChipfuseError

_STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
# Optimizer state flattened to one key per parameter and field ("state.blocks.3.qkv.weight.exp_avg"):
# a pipeline stage then loads just its parameters' state, whichever plan wrote the checkpoint.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
FORMAT_VERSION = 1


class CheckpointError(ChipfuseError):
    """A checkpoint directory that cannot be used (none there, or every one damaged)."""


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RNG_FILE = "rng.json"


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    sha256: str
    bytes: Annotated[int, validate.Range(0, 1 << 50)]


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json, checked by type and range before anything it lists is opened. Keys added
    by later versions (open=True when checking) are kept, not refused: the program writes it."""

    format: Annotated[int, validate.Range(1, FORMAT_VERSION)]
    step: Annotated[int, validate.Range(0, 1 << 40)]
    written_unix_s: float
    world_size: validate.Count
    plan: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry]

    def __post_init__(self) -> None:
        for name, entry in self.files.items():
            # Plain file names only: a manifest must not point the loader outside its directory.
            if name in (".", "..", MANIFEST) or "/" in name or "\\" in name or "\x00" in name:
                raise CheckpointError(f"files.{name}: not a plain file name. Fix: this checkpoint was not written "
                                      "by chipfuse; do not load it")
            if not _SHA256_RE.match(entry.sha256):
                raise CheckpointError(f"files.{name}.sha256: found {entry.sha256[:80]!r}, not 64 hex digits. "
                                      "Fix: this checkpoint was not written by chipfuse; do not load it")


@dataclass(frozen=True, kw_only=True)
class Resumed:
    """What a loaded checkpoint says about where training stands."""

    path: Path
    step: int
    """Optimizer steps completed; the data position (the next step to train)."""
    plan: dict[str, Any]
    """The plan that wrote it (JSON dict), to compare with the plan that resumes."""
    extra: dict[str, Any]
    passed_over: tuple[str, ...] = field(default=())
    """One line per newer checkpoint that failed verification and was not used."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as plain JSON values (no pickle: loading one runs no code)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(words), gauss],
            "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: Any, source: str) -> None:
    try:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        version, words, gauss = state["python"]
        random.setstate((int(version), tuple(int(w) for w in words), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{source}: malformed RNG state ({type(e).__name__}: {e}). Fix: this checkpoint "
                              "was not written by chipfuse, or is damaged; use another") from None


def save(directory: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         plan: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 3,
         state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically; every rank calls this. Returns the final directory.

    `keep`: how many complete checkpoints to keep (older ones are deleted after this one lands).
    `state`: more tensors (nested dicts of them) to keep beside the model and optimizer, such as
    DiLoCo's outer state; read back with `load_state`.
    """
    root = Path(directory)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash during an earlier write of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    with _one_process_is_fine():
        dcp.save({"model": model_sd, "optim": optim_sd, **(state or {})}, checkpoint_id=str(tmp),
                 no_dist=not dist.is_initialized())
    _hook("after_tensors", tmp)

    rngs: list[Any] = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs[0] = _rng_state()

    if _rank() == 0:
        (tmp / RNG_FILE).write_text(json.dumps(rngs))
        files = {}
        for f in sorted(tmp.iterdir()):
            files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        manifest = {"format": FORMAT_VERSION, "step": step, "written_unix_s": time.time(),
                    "world_size": len(rngs), "plan": plan, "extra": extra or {}, "files": files}
        mpath = tmp / MANIFEST
        with mpath.open("w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): swap, never mix
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        for stale in complete_steps(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(step_dir(root, stale), ignore_errors=True)
    _barrier()
    return final


# ------------------------------------------------------------------------------------------------
# Loading runs no code from the checkpoint. DCP keeps tensors in torch.save format (read with
# weights_only=True), but its index (.metadata) is a plain pickle and the default planner reads
# non-tensor values (optimizer hyper-parameters) with weights_only=False. Both go through a
# restricted unpickler first: only the classes DCP's own index and plain values use.

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == _METADATA_MODULE:  # DCP's own index classes (dataclasses, an enum), nothing imported there
            obj = getattr(dcp.metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == _METADATA_MODULE:
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _check_index(path: Path) -> None:
    index = path / ".metadata"
    try:
        with index.open("rb") as f:
            _IndexUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as e:
        raise CheckpointError(f"{index}: refused ({e}). Fix: load only checkpoints chipfuse wrote") from None


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with the index checked by a restricted unpickler before DCP reads it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        _check_index(Path(self.path))
        return super().read_metadata(*args, **kwargs)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but a non-tensor value must pass torch's weights_only unpickler first."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - the safe unpickler refused it: so do we
            raise CheckpointError(f"{read_item.dest_index.fqn}: refused a value that is not plain data "
                                  f"({type(e).__name__}). Fix: load only checkpoints chipfuse wrote") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    _check_index(path)  # here too, so that a refusal is one CheckpointError, not DCP's wrapped report
    try:
        with _one_process_is_fine():  # DCP loads in place, into these very dicts
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner(),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        why = next((str(x) for x in errors if isinstance(x, CheckpointError)), None)
        if why is None:
            raise
        raise CheckpointError(why) from None


def _hook(point: str, path: Path) -> None:
    """Tests only: CHIPFUSE_TEST_SAVE_PAUSE="point:seconds" holds a save at `point` (so a test can
    kill the worker there, mid-write, for real)."""
    spec = os.environ.get("CHIPFUSE_TEST_SAVE_PAUSE", "")
    if spec.partition(":")[0] == point:
        (path.parent / f".paused_{point}").touch()
        time.sleep(float(spec.partition(":")[2] or 30))


def load_state(path: str | Path, state: dict[str, Any]) -> bool:
    """Fill `state` (tensors, in nested dicts, as given to `save(state=...)`) from checkpoint `path`,
    in place. False, and `state` untouched, when the checkpoint holds none of it (written by a run
    without that state, e.g. without islands)."""
    first = next(iter(state), None)
    keys = _SafeReader(str(path)).read_metadata().state_dict_metadata
    if first is None or not any(k.startswith(f"{first}.") for k in keys):
        return False
    _dcp_load(state, Path(path))
    return True


def complete_steps(directory: str | Path) -> list[int]:
    """Steps of the directories that finished writing (renamed from .tmp), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name)))


def verify(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError."""
    p = Path(path)
    mpath = p / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no {MANIFEST} (not a chipfuse checkpoint, or written by hand)") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    checked = validate.build(Manifest, manifest, source=str(mpath), error=CheckpointError, open=True)
    for name, meta in checked.files.items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta.bytes:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta.bytes} (truncated)")
        if _sha256(f) != meta.sha256:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted)")
    for f in p.iterdir():
        if f.name != MANIFEST and f.name not in checked.files:
            raise CheckpointError(f"{f}: not listed in the manifest (written after it, or added by hand)")
    return manifest


def find_latest(directory: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint that verifies, its manifest, and a line per newer one passed over.

    `directory` may be a checkpoint root (DIR) or one checkpoint (DIR/step_000123).
    """
    root = Path(directory)
    if (root / MANIFEST).exists() or _STEP_RE.match(root.name):
        return root, verify(root), []  # the user named one checkpoint: no silent fallback
    steps = complete_steps(root)
    if not steps:
        what = "does not exist" if not root.exists() else "holds no complete checkpoint (step_NNNNNN/)"
        raise CheckpointError(f"{root}: {what}. Fix: give the --checkpoint-dir of a run that saved one, "
                              "or start without --resume")
    passed: list[str] = []
    for s in reversed(steps):
        path = step_dir(root, s)
        try:
            return path, verify(path), passed
        except CheckpointError as e:
            passed.append(f"checkpoint {path.name} is unusable: {e}")
    raise CheckpointError(f"{root}: every checkpoint failed verification:\n  " + "\n  ".join(passed)
                          + "\nFix: restore the directory from a backup, or start without --resume")


def load(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         log: Any = print) -> Resumed:
    """Load the newest good checkpoint into `model` and `optimizer` (every rank calls this).

    Rank 0 verifies and tells the others which one to use, so all ranks load the same step even
    if a file changes under them. Each rank gets back the RNG state its rank saved (rank 0's when
    the new job has more ranks than the old one).
    """
    choice: list[Any] = [None]
    if _rank() == 0:
        try:
            choice[0] = find_latest(directory)
        except CheckpointError as e:
            choice[0] = e
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    path, manifest, passed = choice[0]
    if _rank() == 0:
        for line in passed:
            log(f"chipfuse: {line}; using the previous one, {path.name}")

    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    _dcp_load({"model": model_sd, "optim": optim_sd}, path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)

    rngs = _read_rngs(path)
    if rngs:
        _set_rng_state(rngs[_rank()] if _rank() < len(rngs) else rngs[0], str(path / RNG_FILE))
    return Resumed(path=path, step=int(manifest["step"]), plan=manifest.get("plan", {}),
                   extra=manifest.get("extra", {}), passed_over=tuple(passed))


def _read_rngs(path: Path) -> list[Any]:
    """Every rank's RNG state from rng.json. A checkpoint of the first format kept them in a pickle
    (rng.pt): that is loaded with weights_only=True, which runs no code, and when it refuses (numpy
    arrays are not plain tensors) the RNG is not restored, and the log says so."""
    f = path / RNG_FILE
    if f.is_file():
        try:
            rngs = json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"{f}: unreadable ({e}). Fix: use another checkpoint") from None
        if not isinstance(rngs, list) or not rngs:
            raise CheckpointError(f"{f}: found {type(rngs).__name__}, expected a list of RNG states. "
                                  "Fix: use another checkpoint")
        return rngs
    old = path / "rng.pt"
    if old.is_file():
        try:
            torch.load(old, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal of the safe unpickler means: do not restore
            warnings.warn(f"{old}: not restored ({type(e).__name__}); loading it would need a full unpickle, "
                          "which could run code. Data order does not depend on it", stacklevel=2)
    return []


def check_resumable(saved_plan: dict[str, Any], plan: Any, source: str) -> None:
    """A checkpoint continues the same training only with the same model, batch and sequence.

    The plan's devices and shares may differ (that is the point of re-planning); what fixes the
    samples of each step (global_batch, seq_len), the tensors' shapes (model) and which of them have
    optimizer state (freeze) may not.
    """
    if not saved_plan:
        return
    new = json.loads(json.dumps(plan.to_dict() if hasattr(plan, "to_dict") else plan))  # tuples -> lists
    saved_plan = json.loads(json.dumps(saved_plan))  # read from a file or still in memory: compared alike
    for key in ("model", "global_batch", "seq_len", "freeze"):
        if key in saved_plan and saved_plan[key] != new.get(key):
            raise CheckpointError(
                f"{source}: written with {key}={saved_plan[key]!r}, the new plan has {new.get(key)!r}; "
                f"resuming would not continue the same training. Fix: plan again with the same {key} "
                "(`chipfuse plan`), or start a new run without --resume")
