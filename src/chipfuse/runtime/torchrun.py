"""torchrun, quiet on a worker's failure: the failed worker has already printed its one-line
error, so the elastic agent's own traceback and failure table (and its SIGTERM notices to the
survivors) would only bury it. Exit status: the agent's, or 1 when a worker failed.

    python -m chipfuse.runtime.torchrun [torchrun arguments]
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
