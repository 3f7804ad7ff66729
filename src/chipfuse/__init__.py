"""chipfuse: train one model across a pool of mixed, unequal chips."""

__version__ = "0.1.0"
