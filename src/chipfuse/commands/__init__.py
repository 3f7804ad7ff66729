"""Subcommands of `chipfuse`; each module exposes register(subparsers)."""
