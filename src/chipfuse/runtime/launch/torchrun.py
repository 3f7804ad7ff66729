"""torchrun, quiet on a worker's failure: the failed worker has already printed its one-line
error, so the elastic agent's own traceback and failure table (and its SIGTERM notices to the
survivors) would only bury it. Exit status: the agent's, or 1 when a worker failed.

    python -m chipfuse.runtime.launch.torchrun [torchrun arguments]
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
    except ChildFailedError as e:
        # A worker killed by a signal (not the agent's SIGTERM to the survivors) printed nothing itself.
        for rank, f in sorted(e.failures.items()):
            if f.exitcode < 0 and f.signal_name() != "SIGTERM":
                print(f"chipfuse: error: worker rank {rank} was killed by {f.signal_name()} (pid {f.pid}). Fix: look "
                      "for the kernel's reason (out of host memory: dmesg), or run with fewer workers per host",
                      file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
