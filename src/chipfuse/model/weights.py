"""Hugging Face weights in and out: `--init-from DIR`, serving's stages and `chipfuse export`.

In: each rank opens the folder's safetensors files with safetensors' `safe_open` and reads only
the tensors its stage holds (by the full model's parameter names, which are the names
transformers saves), checking each tensor's shape and dtype first. A tied head with no tensor of
its own in the folder (transformers saves the shared matrix once) reads the embedding's.

Out (model/export.py): a chipfuse checkpoint written back as a Hugging Face folder.

Family-free: tensors by name. What a family's model names them is model/build.py's and the family's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# Float dtypes a checkpoint may store; each is cast to the parameter's dtype (fp32 master weights).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class WeightsError(ChipfuseError):
    """A Hugging Face folder whose weights do not fit the model: missing, misshapen, wrong dtype."""


def weight_files(directory: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (sharded with an index, or one file)."""
    d = Path(directory)
    if (d / INDEX).is_file():
        try:
            wm = json.loads((d / INDEX).read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{d / INDEX}: field 'weight_map' unreadable ({e}). "
                               "Fix: write the index as transformers' save_pretrained does") from None
        return {k: d / v for k, v in wm.items()}
    if (d / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(d / SINGLE), framework="pt") as f:
            return dict.fromkeys(f.keys(), d / SINGLE)
    raise WeightsError(f"{d}: neither {SINGLE} nor {INDEX} found. Fix: give a Hugging Face model folder saved "
                       "with safetensors (save_pretrained(..., safe_serialization=True))")


def _source_key(name: str, files: dict[str, Path], tied: dict[str, str], prefixes: tuple[str, ...]) -> str | None:
    if name in files:
        return name
    if name in tied and tied[name] in files:
        return tied[name]
    for p in prefixes:  # older checkpoints saved without the base model's prefix (GPT-2's "h.0...")
        if name.startswith(p) and name[len(p):] in files:
            return name[len(p):]
    return None


def match_tensors(shapes: dict[str, tuple[int, ...]], directory: str | Path,
                  tied: dict[str, str]) -> dict[Path, list[tuple[str, str]]]:
    """For every parameter name (-> its shape), the file and tensor that hold it, checked for
    presence, shape and dtype from the safetensors headers only (no tensor data is read)."""
    from safetensors import safe_open

    files = weight_files(directory)
    d = Path(directory)
    plan: dict[Path, list[tuple[str, str]]] = {}
    for name in shapes:
        key = _source_key(name, files, tied, ("transformer.", "model."))
        if key is None:
            where = d / (INDEX if (d / INDEX).is_file() else SINGLE)
            raise WeightsError(f"{where}: tensor {name!r} missing ({len(files)} tensors, none of that name). "
                               "Fix: use the weights saved with this model's config.json (the folder that "
                               "holds both)")
        plan.setdefault(files[key], []).append((name, key))
    for path, pairs in plan.items():
        with safe_open(str(path), framework="pt") as f:
            for name, key in pairs:
                sl = f.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != tuple(shapes[name]):
                    raise WeightsError(f"{path}: tensor {key!r}: shape {list(shape)}, the model's config needs "
                                       f"{list(shapes[name])}. Fix: use the config.json saved with these weights")
                if dtype not in FLOAT_DTYPES:
                    raise WeightsError(f"{path}: tensor {key!r}: dtype {dtype}, chipfuse loads float weights "
                                       f"({', '.join(FLOAT_DTYPES)}). Fix: dequantize the checkpoint first")
    return plan


@torch.no_grad()
def load_weights(module: nn.Module, directory: str | Path, *, tied: dict[str, str] | None = None) -> int:
    """Load every parameter of `module` (a stage or a whole model) from the folder's safetensors,
    reading only those tensors. Refused before any is copied when one is missing or does not fit
    (float tensors of another dtype are cast to the parameter's). Returns the bytes read."""
    from safetensors import safe_open

    params = dict(module.named_parameters(remove_duplicate=False))
    plan = match_tensors({n: tuple(p.shape) for n, p in params.items()}, directory, tied or {})
    nbytes = 0
    for path, pairs in plan.items():
        with safe_open(str(path), framework="pt") as f:
            for name, key in pairs:
                t = f.get_tensor(key)
                params[name].copy_(t)
                nbytes += t.numel() * t.element_size()
    return nbytes


def copy_tokenizer(src: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer files a Hugging Face folder has; returns their names."""
    copied = []
    for n in TOKENIZER_FILES:
        if (Path(src) / n).is_file():
            shutil.copy2(Path(src) / n, Path(out) / n)
            copied.append(n)
    return copied
