"""Former name of chipfuse.plan.memory (one memory model for the planner and the runtime): kept so that
`from chipfuse.plan.memory_model import ...` in other modules keeps working. New code imports plan.memory."""

from chipfuse.plan.memory import (  # noqa: F401
    DTYPE_BYTES,
    OPT_BYTES_PER_PARAM,
    DeviceMemory,
    Strategy,
    activation_bytes_per_token,
    best_shard_group,
    check_plan_memory,
    compute_dtype,
    gpt_tensor_numels,
    plan_memory,
    stage_device_memory,
    usable_bytes,
)
