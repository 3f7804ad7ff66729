"""Tables for the terminal, JSON for scripts, pictures for people."""
