"""``twistd`` whose reactor reads a wall clock that a test can step.

Usage: ``python steppable_twistd.py OFFSET_FILE [twistd arguments]``. The reactor's
``seconds()`` (the wall clock of everything the daemon schedules or labels) is
``time.time()`` plus the number of seconds in OFFSET_FILE, read again every 50 ms; the
monotonic clock is left alone, as NTP or an operator stepping the system clock would.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path


def main() -> None:
    offset_file = Path(sys.argv[1])
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    cache = {"offset": 0.0, "read_at": float("-inf")}

    def seconds() -> float:
        now = time.monotonic()
        if now - cache["read_at"] > 0.05:
            with contextlib.suppress(OSError, ValueError):
                cache["offset"] = float(offset_file.read_text() or 0)
            cache["read_at"] = now
        return time.time() + cache["offset"]

    reactor.seconds = seconds  # type: ignore[method-assign]
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
