"""``python -m taskscheduler.tokens``: the token tool's older name, which
``docker-compose.yml`` and ``scripts/playground`` run; the tool itself is
``taskscheduler tokens`` (``cli/tokens.py``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import click

from taskscheduler.cli.tokens import tokens


@contextlib.contextmanager
def _stdin(stream: TextIO) -> Iterator[None]:
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``taskscheduler tokens ARGV`` on these streams; its exit status."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            _stdin(sys.stdin if stdin is None else stdin),
        ):
            tokens.main(args, prog_name="python -m taskscheduler.tokens", standalone_mode=False)
    except click.ClickException as e:
        e.show(file=stderr)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
