"""Training data: the built-in corpus (the default), the user's text, JSON lines or token files,
one sampling rule fixed by (seed, step, index), and a held-out split. See docs/data.md."""

from chipfuse.data.loader import (
    DataConfig,
    Loader,
    batch_indices,
    check_same_source,
    corpus,
    get_batch,
    open_loader,
)
from chipfuse.data.sources import TokenSource, open_source
from chipfuse.data.tokenize import DataError

__all__ = ["DataConfig", "DataError", "Loader", "TokenSource", "batch_indices", "check_same_source", "corpus",
           "get_batch", "open_loader", "open_source"]
