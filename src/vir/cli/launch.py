"""`python -m vir.cli.launch ARGS`: torchrun with ARGS, ending as its workers did.

torchrun answers any worker that fails with a traceback of its own (`ChildFailedError` and a "Root Cause" box),
after the worker has already printed its one-line error (a config mistake, another run's directory, a full
disk). This launcher runs the same torchrun and exits with the failed worker's status instead (2 for such a
mistake), so `make train` ends on the line that says what to do.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main() -> None:
    try:
        torchrun()
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        sys.exit(failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
