"""Event-by-event replay of one training step of a plan (chipfuse.sim.pipeline)."""
