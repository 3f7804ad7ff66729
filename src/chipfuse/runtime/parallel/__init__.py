"""The parallelisms, one file each, applied to a stage module by runtime/parallelize.py in one order."""
