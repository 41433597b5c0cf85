"""The agent's server replicas: which one it talks to, and when it moves to the next.

``--server`` takes one base URL or a comma-separated list of them, the replicas of one
taskscheduler server (one PostgreSQL, one signing key). The agent talks to one at a
time, the *current* one, and stays on it while it answers. Trouble moves it to the next
in the list (round it: after the last comes the first):

- no connection (refused, unreachable, a name that does not resolve, a TLS failure);
- no whole answer within :data:`FAILOVER_TIMEOUT` seconds (a second more per MiB sent,
  so that a large batch over a slow link is not taken for a dead server); with a single
  server the caller's own timeout applies, there being nowhere else to go;
- a 5xx answer (502, 503 and 504 from a load balancer or a replica without its
  database among them).

Any other answer, a 4xx above all, is the server's word on the request, which another
replica would give too: no failover. The request that met trouble is sent to the next
replica at once (:meth:`taskscheduler.agent.server_client.ServerClient._post`), each
replica tried at most once per request, so a failover costs at most the timeout; what
was not acknowledged stays in the spool and goes to whichever replica answers next, and
the server takes a result it has twice as a ``duplicate``.

Patience grows when every replica is slow rather than dead. A switch for want of an
answer escalates the attempt timeout for the next attempts (4 s, then 8, 16, up to the
30 s a single server gets, each escalated step stretched by up to half again at random,
so a fleet's agents do not give up in step), and the current replica answering within
the first 4 s brings it back to 4 s. A hung replica among healthy ones is thus left in
4 s (the next one answers at once), while replicas that all answer in 6 s see an agent
move once and then stay, instead of moving and resending every request (a failover
storm on servers already overloaded). An answer slower than 4 s keeps the patience: it
is what let that answer come. No connection and 5xx answers move at once and change no
patience (they come fast), and a timeout the caller chose shorter than 4 s (a claim's,
up to the task's next instant) is no trouble of the replica's: no switch.

Each switch is logged once (a warning), not each request; once every replica has failed
in a row, one more warning says so and the switches go quiet until one answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from twisted.logger import Logger

#: Seconds without a whole answer after which the next replica is tried.
FAILOVER_TIMEOUT = 4.0
#: Seconds more per MiB of request body, beside :data:`FAILOVER_TIMEOUT`.
SECONDS_PER_MIB = 1.0
#: The longest attempt timeout escalation reaches: a single server's request timeout.
LONGEST_FAILOVER_TIMEOUT = 30.0
#: Each escalated step is stretched by up to this fraction of itself, at random.
ESCALATION_JITTER = 0.5


def parse_server_urls(text: str) -> tuple[str, ...]:
    """The base URLs of a ``--server`` value (one URL, or several separated by commas),
    each without its trailing ``/``; ValueError saying what is wrong with it."""
    urls = tuple(part.strip().rstrip("/") for part in text.split(","))
    if not any(urls):
        raise ValueError("--server must name at least one base URL like http://host:8080")
    seen: set[str] = set()
    for url in urls:
        if not url:
            raise ValueError(f"--server {text!r} has an empty entry (two commas in a row?)")
        problem = _url_problem(url)
        if problem is not None:
            raise ValueError(f"--server {url!r} {problem}")
        # Scheme and host are case-blind: http://A:8080 and http://a:8080 are one server.
        key = _normal(url)
        if key in seen:
            raise ValueError(f"--server lists {url!r} twice")
        seen.add(key)
    return urls


def _url_problem(url: str) -> str | None:
    if not url.startswith(("http://", "https://")):
        return "must be a base URL like http://host:8080"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as e:
        return f"is not a valid URL ({e})"
    if not parts.hostname:
        return "names no host"
    if parts.query or parts.fragment or "@" in parts.netloc or " " in url:
        return "must be a plain base URL (no user, query, fragment or spaces)"
    return None


def _normal(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}{parts.path}"


class ServerChooser:
    """Which replica of ``urls`` requests go to: the current one, until it fails."""

    log = Logger()

    def __init__(
        self,
        urls: Sequence[str],
        failover_timeout: float = FAILOVER_TIMEOUT,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not urls:
            raise ValueError("no server URL")
        self.urls = tuple(url.rstrip("/") for url in urls)
        self._failover_timeout = failover_timeout
        self._jitter = jitter
        #: Seconds the next attempts wait (before the per-MiB part): escalated by
        #: switches for want of an answer, back to the failover timeout on a quick one.
        self.patience = failover_timeout
        self._index = 0
        #: Switches from one replica to the next, over the agent's life.
        self.failovers = 0
        #: Replicas that failed in a row since one last answered.
        self._failed_in_a_row = 0

    @property
    def current(self) -> str:
        """The base URL requests go to now."""
        return self.urls[self._index]

    def attempt_timeout(self, body_bytes: int) -> float:
        """Seconds one attempt waits for an answer before another replica is tried
        (infinite with a single server: the caller's timeout is the only one)."""
        if len(self.urls) == 1:
            return float("inf")
        return self.patience + SECONDS_PER_MIB * body_bytes / (1024 * 1024)

    def first_timeout(self, body_bytes: int) -> float:
        """The attempt timeout before any escalation: an answer within it is a quick one,
        and only a wait at least this long without one is the replica's trouble."""
        return self._failover_timeout + SECONDS_PER_MIB * body_bytes / (1024 * 1024)

    def answered(self, url: str, quickly: bool = True) -> None:
        """``url`` answered (anything but a 5xx): stay on it; ``quickly`` (within
        :meth:`first_timeout`) ends any escalation of the attempt timeout."""
        if url != self.current:
            return
        if quickly:
            self.patience = self._failover_timeout
        if self._failed_in_a_row == 0:
            return
        if self._failed_in_a_row >= len(self.urls):
            self.log.info("the server at {url} answers again; the agent uses it", url=url)
        self._failed_in_a_row = 0

    def failed(self, url: str, trouble: str, timed_out: bool = False) -> None:
        """A request to ``url`` met trouble: move to the next replica, unless another
        request has already moved away from ``url``; ``timed_out`` (no answer in time,
        rather than none possible) escalates the attempt timeout for the next attempts."""
        if url != self.current or len(self.urls) == 1:
            return
        if timed_out:
            # Doubled, stretched at random so that a fleet's agents spread out.
            step = 2 * self.patience * (1 + ESCALATION_JITTER * self._jitter())
            self.patience = min(LONGEST_FAILOVER_TIMEOUT, step)
        self._index = (self._index + 1) % len(self.urls)
        self.failovers += 1
        self._failed_in_a_row += 1
        if self._failed_in_a_row < len(self.urls):
            self.log.warn(
                "the server at {url} failed ({trouble}); failing over to {next}",
                url=url,
                trouble=trouble,
                next=self.current,
            )
        elif self._failed_in_a_row == len(self.urls):
            self.log.warn(
                "none of the {count} servers answers (the last, {url}: {trouble}); the agent "
                "keeps trying them in turn, from {next}",
                count=len(self.urls),
                url=url,
                trouble=trouble,
                next=self.current,
            )
        else:
            self.log.debug(
                "the server at {url} failed ({trouble}); trying {next}",
                url=url,
                trouble=trouble,
                next=self.current,
            )
