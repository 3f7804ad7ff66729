"""Built-in pools, so the main job runs with no file at all."""

from __future__ import annotations

from chipfuse.cluster.pool import Pool, pool_from_dict


def default_pool() -> Pool:
    """Three emulated devices of relative speeds 4 : 2 : 1, scaled to fit two CPU cores.

    The speeds sum to 1.4 workers of one thread each: the emulation stays faithful only
    while the sum stays under about 1.6 cores (docs/emulation.md, "Facts measured on CPU").
    """
    return pool_from_dict(
        {
            "name": "builtin-4-2-1",
            "node": [
                {
                    "name": "host0",
                    "device": [
                        {"name": "fast", "chip": "cpu", "emulate": {"speed": 0.8}},
                        {"name": "mid", "chip": "cpu", "emulate": {"speed": 0.4}},
                        {"name": "slow", "chip": "cpu", "emulate": {"speed": 0.2, "memory_gib": 1.0}},
                    ],
                }
            ],
        },
        source="<builtin default pool>",
    )
