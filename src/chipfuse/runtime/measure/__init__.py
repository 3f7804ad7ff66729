"""Measuring devices and models: the profiler and the memory probes."""
