"""Emulated devices: pacing to a relative speed, a memory cap, slow links."""
