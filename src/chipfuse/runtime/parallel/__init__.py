"""The parallelisms, one file each, applied to a stage module by runtime/parallel/parallelize.py in one order."""
