"""``taskscheduler tokens new|hash``: make and hash API tokens (no server involved).

``new NAME`` prints a fresh token once, alone on stdout (so ``TOKEN=$(... new alice)``
captures exactly the token), and on stderr the line to append to the tokens file. The
token itself is stored nowhere: give it to its holder.

``hash [TOKEN]`` prints the tokens-file line (``NAME sha256:...`` with ``--name``, else
the bare hash) for an existing token. Without TOKEN, or with ``-``, the token is read from
stdin, which keeps it out of shell history and process listings.
"""

from __future__ import annotations

import sys

import click

KINDS = ("operator", "agent", "join")
NAME_RULE = (
    "a name starts with a letter or digit and contains only letters, digits and . _ @ + - "
    "(at most 128 characters)"
)


def _check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Imported here: auth pulls in Twisted, which the other verbs need not load.
    from taskscheduler.auth import is_valid_principal_name

    if value is not None and not is_valid_principal_name(value):
        raise click.BadParameter(NAME_RULE)
    return value


@click.group()
def tokens() -> None:
    """Make and hash API tokens (no server needed)."""


@tokens.command("new")
@click.argument("name", callback=_check_name)
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="operator",
    show_default=True,
    help="operator API token, agent credential, or join secret",
)
def new(name: str, kind: str) -> None:
    """Print a fresh token for NAME (e.g. alice, ci-deploy) and its tokens-file line."""
    from taskscheduler.auth import AGENT_PREFIX, JOIN_PREFIX, OPERATOR_PREFIX, hash_token, new_token

    prefix = {"operator": OPERATOR_PREFIX, "agent": AGENT_PREFIX, "join": JOIN_PREFIX}[kind]
    token = new_token(prefix)
    click.echo(token)
    sys.stdout.flush()
    click.echo(
        "This token is shown only once; give it to its holder.\n"
        "Add this line to the tokens file (it holds only the hash):\n"
        f"{name} {hash_token(token)}",
        err=True,
    )


@tokens.command("hash")
@click.argument("token", default="-")
@click.option("--name", callback=_check_name, help="Print a whole tokens-file line for NAME.")
def hash_(token: str, name: str | None) -> None:
    """Print the stored form of TOKEN (or of the token on stdin, with - or nothing)."""
    from taskscheduler.auth import hash_token

    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise click.UsageError("no token given (pass it as an argument or on stdin)")
    click.echo((f"{name} " if name else "") + hash_token(token))


hash_.name = "hash"
