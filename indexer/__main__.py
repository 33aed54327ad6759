"""``python -m indexer`` and the ``mention-indexer`` script.

The SIGTERM handler goes in before anything heavy is imported: an orchestrator may stop the pod
while it is still starting, and ``run`` must then exit 0, not die of the signal.  The
service installs its own handler once its loop runs.
"""

import signal
import sys


def _terminated_while_starting(signum: int, _frame: object) -> None:
    # Nothing has been consumed yet, so for `run` stopping now is a clean stop.
    raise SystemExit(0 if sys.argv[1:2] == ["run"] else 128 + signum)


def entry() -> int:
    signal.signal(signal.SIGTERM, _terminated_while_starting)
    from indexer.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
