"""`chipfuse train` flags for the data and the optimisation recipe (docs/data.md).

Kept out of commands/train.py so that the train command only calls: `add_arguments`, `check`
(refusals before any worker starts: bad data, a bad recipe, resuming on other data),
`config` (the workers' DataConfig and Recipe)."""

from __future__ import annotations

import argparse

from chipfuse.data.loader import DataConfig, check_same_source, open_loader
from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.train.recipe import Recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and recipe (docs/data.md)")
    g.add_argument("--data", metavar="PATH", help="train on this text file or folder, JSON-lines file or token file "
                   "(.bin, from `chipfuse data prepare`, nanoGPT or Megatron); default: the built-in corpus")
    g.add_argument("--tokenizer", metavar="DIR|tokenizer.json", help="tokenize text --data with this tokenizer "
                   "(default: UTF-8 bytes)")
    g.add_argument("--text-field", default="text", metavar="NAME", help="the JSON-lines field with the text")
    g.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out the last F of the tokens for validation (default 0: none)")
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="validation loss and perplexity every STEPS steps and after the last (needs --val-fraction)")
    g.add_argument("--eval-samples", type=int, default=0, metavar="N",
                   help="validation samples per evaluation (default: one global batch)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate after warm-up: constant (default) or cosine decay to --min-lr")
    g.add_argument("--warmup-steps", type=int, default=0, metavar="STEPS", help="linear learning-rate warm-up")
    g.add_argument("--min-lr", type=float, default=None, help="where cosine decay ends (default: --lr / 10)")
    g.add_argument("--decay-steps", type=int, default=None, metavar="STEPS",
                   help="the step where cosine decay reaches --min-lr (default: --steps)")
    g.add_argument("--grad-clip", type=float, default=0.0, metavar="NORM",
                   help="clip gradients to this global norm (default 0: off)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of the weight matrices (default 0)")


def config(args: argparse.Namespace) -> tuple[DataConfig, Recipe]:
    data = DataConfig(path=args.data, tokenizer=args.tokenizer, text_field=args.text_field,
                      val_fraction=args.val_fraction, eval_every=args.eval_every, eval_samples=args.eval_samples)
    recipe = Recipe(lr=args.lr, schedule=args.lr_schedule, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                    decay_steps=args.decay_steps, grad_clip=args.grad_clip, weight_decay=args.weight_decay)
    return data, recipe


def check(args: argparse.Namespace, plan: Plan) -> None:
    """Everything about the data and the recipe that can be refused before a worker starts."""
    data, recipe = config(args)
    recipe.check()
    if args.tokenizer and not args.data:
        raise ChipfuseError("--tokenizer applies to --data (text). Fix: add --data PATH, or leave --tokenizer out")
    if args.eval_samples < 0:
        raise ChipfuseError(f"--eval-samples {args.eval_samples}: negative. Fix: 0 (one global batch) or more")
    if recipe.grad_clip and plan.sync.islands:
        raise ChipfuseError("--grad-clip with DiLoCo islands (plan sync.islands): each island steps on its own "
                            "gradient, so there is no one global norm. Fix: drop --grad-clip or the islands")
    loader = open_loader(data, global_batch=plan.global_batch, seq_len=plan.seq_len,
                         vocab_size=plan.model.vocab_size, seed=args.seed)
    if getattr(args, "resume", None):
        from chipfuse.runtime.endure import checkpoint

        path, manifest, _ = checkpoint.find_latest(args.resume)
        check_same_source(manifest.get("extra", {}).get("data"), loader.position(0), str(path))
