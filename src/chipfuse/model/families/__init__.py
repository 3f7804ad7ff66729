"""One module per model family (model/family.py says what a row declares; model/registry.py lists them)."""
