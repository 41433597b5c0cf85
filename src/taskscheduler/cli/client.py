"""The server's REST API as the command calls it, and the command's failures.

One synchronous httpx client; each route is a method returning the server's JSON. Every
way a call can fail becomes a :class:`CliError` carrying the command's exit code, here
and nowhere else: 3 unreachable, 4 credential refused, 5 unknown id, 6 ambiguous prefix,
1 anything else (2, usage, is click's).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from importlib import metadata
from typing import IO, Any
from urllib.parse import quote

import click
import httpx

JSON = dict[str, Any]

EXIT_OTHER = 1
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_NOT_FOUND = 5
EXIT_AMBIGUOUS = 6

# 404 codes that mean "no such id"; others (a deleted task, a missing route) are not that.
NOT_FOUND_CODES = frozenset({"unknown_task", "unknown_agent", "unknown_execution", "not_in_fleet"})
# The largest page the task list serves (API10: limit 1..500).
TASK_PAGE = 500


class CliError(click.ClickException):
    """A failure the command reports in one line on stderr, with its own exit code."""

    exit_code = EXIT_OTHER

    def show(self, file: IO[Any] | None = None) -> None:
        # Without click's "Error: " prefix: the message says what failed.
        click.echo(self.format_message(), file=file, err=file is None)


class Unreachable(CliError):
    exit_code = EXIT_UNREACHABLE


class CredentialRefused(CliError):
    exit_code = EXIT_REFUSED


class NotFound(CliError):
    exit_code = EXIT_NOT_FOUND


class Ambiguous(CliError):
    exit_code = EXIT_AMBIGUOUS


def _version() -> str:
    try:
        return metadata.version("taskscheduler")
    except metadata.PackageNotFoundError:
        return "unknown"


def _reason(error: httpx.TransportError) -> str:
    """What went wrong, without the errno noise: ``connection refused``."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


class Client:
    """The operator routes of one server, called with one token (or none)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token_given = bool(token)
        self._timeout = timeout
        headers = {"User-Agent": f"taskscheduler-cli/{_version()}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    # -- tasks ---------------------------------------------------------------------------

    def create_task(
        self,
        command: str,
        frequency: str | None,
        time_limit: int | None,
        options: JSON | None = None,
    ) -> JSON:
        """``options`` holds the other fields, ``cron`` and ``timezone`` among them."""
        body: JSON = {"command": command, **(options or {})}
        if frequency is not None:
            body = {"command": command, "frequency": frequency, **(options or {})}
        if time_limit is not None:
            body["time_limit_seconds"] = time_limit
        return self._call("POST", "/api/v1/tasks/create", body=body)

    def list_tasks(
        self,
        limit: int = 100,
        cursor: str | None = None,
        state: str | None = None,
        command: str | None = None,
    ) -> JSON:
        params = {"limit": limit, "cursor": cursor, "state": state, "command": command}
        return self._call("GET", "/api/v1/tasks", params=params)

    def iter_task_pages(
        self, state: str | None = None, command: str | None = None, limit: int | None = None
    ) -> Iterator[JSON]:
        """Every page of the task list, newest first, until ``limit`` tasks or the end."""
        cursor: str | None = None
        seen = 0
        while True:
            size = TASK_PAGE if limit is None else min(TASK_PAGE, limit - seen)
            page = self.list_tasks(size, cursor, state, command)
            yield page
            seen += len(page.get("tasks", []))
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and seen >= limit):
                return

    def get_task(self, task_id: str) -> JSON:
        return self._call("GET", f"/api/v1/tasks/{task_id}")

    def update_task(self, task_id: str, changes: JSON) -> JSON:
        return self._call("PATCH", f"/api/v1/tasks/{task_id}", body=changes)

    def pause_task(self, task_id: str) -> JSON:
        return self._call("POST", f"/api/v1/tasks/{task_id}/pause")

    def resume_task(self, task_id: str) -> JSON:
        return self._call("POST", f"/api/v1/tasks/{task_id}/resume")

    def run_task(self, task_id: str) -> JSON:
        return self._call("POST", f"/api/v1/tasks/{task_id}/run")

    def delete_task(self, task_id: str) -> JSON:
        return self._call("DELETE", f"/api/v1/tasks/{task_id}")

    def latest_output(self, task_id: str) -> JSON:
        return self._call("GET", f"/api/v1/tasks/{task_id}/latest_output")

    def executions(self, task_id: str, limit: int, before: str | None = None) -> JSON:
        params = {"limit": limit, "before": before}
        return self._call("GET", f"/api/v1/tasks/{task_id}/executions", params=params)

    def execution(self, task_id: str, scheduled_at: str) -> JSON:
        at = quote(scheduled_at, safe="")
        return self._call("GET", f"/api/v1/tasks/{task_id}/executions/{at}")

    def notifications(self, task_id: str, limit: int, before: int | None = None) -> JSON:
        params = {"limit": limit, "before": before}
        return self._call("GET", f"/api/v1/tasks/{task_id}/notifications", params=params)

    # -- agents and the fleet ------------------------------------------------------------

    def list_agents(self) -> JSON:
        return self._call("GET", "/api/v1/agents")

    def get_agent(self, agent_id: str) -> JSON:
        return self._call("GET", f"/api/v1/agents/{agent_id}")

    def revoke_agent(self, agent_id: str) -> JSON:
        return self._call("DELETE", f"/api/v1/agents/{agent_id}")

    def release_agent_url(self, agent_id: str) -> JSON:
        return self._call("POST", f"/api/v1/agents/{agent_id}/release-url")

    def fleet(self) -> JSON:
        return self._call("GET", "/api/v1/fleet")

    def add_to_fleet(self, url: str) -> tuple[JSON, bool]:
        """The member, and whether it is new (201) rather than already there (200)."""
        status, member = self._exchange("POST", "/api/v1/fleet", body={"url": url})
        return member, status == 201

    def remove_from_fleet(self, url: str) -> JSON:
        # The member's URL is one path segment: its slashes and colon encoded.
        return self._call("DELETE", f"/api/v1/fleet/{quote(url, safe='')}")

    # -- audit ---------------------------------------------------------------------------

    def audit(self, limit: int, before: int | None = None) -> JSON:
        return self._call("GET", "/api/v1/audit", params={"limit": limit, "before": before})

    # -- the wire ------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, *, params: JSON | None = None, body: JSON | None = None
    ) -> JSON:
        return self._exchange(method, path, params=params, body=body)[1]

    def _exchange(
        self, method: str, path: str, *, params: JSON | None = None, body: JSON | None = None
    ) -> tuple[int, JSON]:
        """The status and JSON body of a successful call; a CliError otherwise."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=query, json=body)
        except httpx.TimeoutException:
            raise Unreachable(
                f"cannot reach the server at {self.url}: no answer within {self._timeout:g} seconds"
            ) from None
        except httpx.TransportError as e:
            raise Unreachable(f"cannot reach the server at {self.url}: {_reason(e)}") from None
        return response.status_code, self._answer(method, path, response)

    def _answer(self, method: str, path: str, response: httpx.Response) -> JSON:
        try:
            body = response.json()
        except ValueError:
            body = None
        status = response.status_code
        if response.is_success and isinstance(body, dict):
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            # A proxy's page, a redirect, another program on that port.
            raise CliError(
                f"unexpected answer from {self.url} to {method} {path}: "
                f"{status} {response.reason_phrase}, not taskscheduler's JSON"
            )
        code, message = str(error.get("code")), str(error.get("message"))
        said = f"{message} ({status} {code})"
        if status in (401, 403):
            hint = "" if self._token_given else "; no token given (--token or TASKSCHEDULER_TOKEN)"
            raise CredentialRefused(f"the server refused the request: {said}{hint}")
        if status == 404 and code in NOT_FOUND_CODES:
            raise NotFound(said)
        if code in ("not_found", "method_not_allowed"):
            raise CliError(
                f"the server at {self.url} does not serve {method} {path} ({status} {code}): "
                "it may be older than this command"
            )
        retry = response.headers.get("Retry-After")
        raise CliError(said + (f"; retry after {retry} seconds" if retry else ""))
