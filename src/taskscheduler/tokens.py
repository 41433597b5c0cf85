"""Make and hash API tokens: ``python -m taskscheduler.tokens``.

``new NAME`` prints a fresh token once, alone on stdout (so ``TOKEN=$(... new alice)``
captures exactly the token), and on stderr the line to append to the tokens file. The
token itself is stored nowhere: give it to its holder.

``hash [TOKEN]`` prints the tokens-file line (``NAME sha256:...`` with ``--name``, else
the bare hash) for an existing token. Without TOKEN, or with ``-``, the token is read from
stdin, which keeps it out of shell history and process listings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from taskscheduler.auth import (
    AGENT_PREFIX,
    JOIN_PREFIX,
    OPERATOR_PREFIX,
    hash_token,
    is_valid_principal_name,
    new_token,
)

PREFIXES = {"operator": OPERATOR_PREFIX, "agent": AGENT_PREFIX, "join": JOIN_PREFIX}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m taskscheduler.tokens",
        description="Make and hash taskscheduler API tokens.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a fresh token and its tokens-file line")
    new.add_argument("name", help="who holds the token, e.g. alice or ci-deploy")
    new.add_argument(
        "--kind",
        choices=sorted(PREFIXES),
        default="operator",
        help="operator API token (default), agent credential, or join secret",
    )
    hashing = commands.add_parser("hash", help="print the stored form of a token")
    hashing.add_argument("token", nargs="?", default="-", help="the token, or - for stdin")
    hashing.add_argument("--name", help="print a whole tokens-file line for this name")
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = _parser()
    args = parser.parse_args(argv)
    name = args.name
    if name is not None and not is_valid_principal_name(name):
        stderr.write(
            "error: a name starts with a letter or digit and contains only letters, "
            "digits and . _ @ + - (at most 128 characters)\n"
        )
        return 2
    if args.command == "new":
        token = new_token(PREFIXES[args.kind])
        stdout.write(token + "\n")
        stdout.flush()
        stderr.write(
            "This token is shown only once; give it to its holder.\n"
            "Add this line to the tokens file (it holds only the hash):\n"
            f"{name} {hash_token(token)}\n"
        )
        return 0
    token = stdin.readline() if args.token == "-" else args.token
    token = token.strip()
    if not token:
        stderr.write("error: no token given (pass it as an argument or on stdin)\n")
        return 2
    stdout.write((f"{name} " if name else "") + hash_token(token) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
