"""User-facing errors. Each message names the file, the field and the fix."""


class ChipfuseError(ValueError):
    """Bad input from the user: a pool, plan, config or checkpoint that cannot be used."""


class PoolError(ChipfuseError):
    pass


class PlanError(ChipfuseError):
    pass


class DeviceMemoryError(RuntimeError):
    """An (emulated) device ran past its memory cap, as a real chip would."""
