"""Surviving slow, failing and lost devices: checkpoints, guards, rebalancing."""
