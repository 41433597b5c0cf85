"""What every verb shares: the global options' values, one client made on first use,
and how a result is printed (the server's JSON with ``--json``, else for people)."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import click
import httpx

from taskscheduler.cli.client import Client


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Overrides:
    """What a caller may hand in as ``obj`` instead of the real world (tests do)."""

    transport: httpx.BaseTransport | None = None
    now: Callable[[], datetime] = _utcnow
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Settings:
    """The global options, and the one client the verbs share (made on first use)."""

    url: str
    token: str | None
    as_json: bool
    ca_file: str | None
    timeout: float
    overrides: Overrides = field(default_factory=Overrides)
    _client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(
                self.url,
                self.token,
                verify=ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True,
                timeout=self.timeout,
                transport=self.overrides.transport,
            )
            click.get_current_context().call_on_close(self._client.close)
        return self._client

    def now(self) -> datetime:
        return self.overrides.now()

    def sleep(self, seconds: float) -> None:
        self.overrides.sleep(seconds)

    def emit(self, body: object, human: Callable[[], str]) -> None:
        """The server's JSON with ``--json``, else what ``human`` renders for people."""
        if self.as_json:
            click.echo(json.dumps(body, indent=2, ensure_ascii=False))
        else:
            text = human()
            if text:
                click.echo(text)


pass_settings = click.make_pass_decorator(Settings)
