"""`chipfuse export CHECKPOINT --out DIR`: a chipfuse checkpoint as a Hugging Face model folder.

The folder (config.json, model.safetensors, tokenizer files when known) loads with
`AutoModelForCausalLM.from_pretrained(DIR)`; see docs/models.md and chipfuse.model.weights."""

from __future__ import annotations

import argparse

from chipfuse.report.output import console, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder (config.json + safetensors)")
    p.add_argument("checkpoint", help="a checkpoint folder (RUN_DIR/checkpoints/step_NNNNNN)")
    p.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face folder to write")
    p.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer files from this folder (default: the "
                   "folder the run started from, when the checkpoint records it)")
    p.add_argument("--json", metavar="PATH", help="write what was exported as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from chipfuse.model.export import export_checkpoint

    res = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer)
    console.print(f"exported {res['model']} ({res['model_type']}, {res['num_params'] / 1e6:.2f}M params, step "
                  f"{res['step']}) to {res['out']}"
                  + (f" with {', '.join(res['tokenizer_files'])}" if res["tokenizer_files"] else " (no tokenizer)"))
    write_json(args.json, res)
    return 0
