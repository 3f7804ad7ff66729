"""`chipfuse data prepare INPUT --out FILE`: tokenize text once (docs/data.md)."""

from __future__ import annotations

import argparse

from chipfuse.report.output import console, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data (docs/data.md)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="tokenize text files, folders or JSON lines into a token file (.bin)")
    prep.add_argument("input", help="a text file, a folder of them, or a JSON-lines file")
    prep.add_argument("--out", required=True, metavar="FILE", help="the token file to write (FILE.bin; its dtype "
                      "and tokenizer go to FILE.bin.json)")
    prep.add_argument("--tokenizer", metavar="DIR|tokenizer.json", default=None,
                      help="the model's tokenizer (Hugging Face tokenizers); default: UTF-8 bytes")
    prep.add_argument("--text-field", default="text", metavar="NAME", help="the JSON-lines field with the text")
    prep.add_argument("--json", metavar="PATH", help="write what was prepared as JSON")
    prep.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from chipfuse.data.prepare import prepare

    out = prepare(args.input, args.out, tokenizer=args.tokenizer, text_field=args.text_field)
    console.print(f"{out['num_tokens']:,} tokens from {out['documents']:,} documents -> {out['path']} "
                  f"({out['dtype']}, tokenizer {out['tokenizer']}, vocabulary {out['vocab_size']:,}, "
                  f"{out['seconds']:.1f} s)")
    if args.json:
        write_json(args.json, out)
    return 0
