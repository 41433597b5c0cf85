"""The operators' dashboard: one HTML page at ``/`` and its static files under
``/dashboard/`` (plain ES modules and CSS in :mod:`taskscheduler.server`'s ``dashboard``
folder, no build step, nothing from elsewhere).

The files hold no data: the page reads and changes everything through the JSON API with
the operator's token, so they are public (like the OpenAPI document). Every answer carries
a Content-Security-Policy that lets the page load and call nothing but this server, run no
inline script or style, and be framed by nobody; the page inserts data as text only.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from twisted.web.iweb import IRequest

from taskscheduler.server.api.base import Routes, routes
from taskscheduler.web.errors import NOT_FOUND

#: The routes of the dashboard: HTML, JavaScript and CSS, not the JSON API (the OpenAPI
#: document leaves them out).
DASHBOARD_ENDPOINTS = frozenset({"dashboard", "dashboard_asset"})

#: Nothing but this server: no inline script or style (an injected ``<script>`` or
#: ``style=`` would not run), no plugin, no ``<base>``, no framing (clickjacking).
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    b"frame-ancestors 'none'"
)
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
#: A static file's name: one segment, no dot first (no ``..``), a known type.
_ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(js|css|svg|png)")
INDEX = "index.html"


@cache
def assets() -> dict[str, tuple[bytes, bytes]]:
    """name -> (content type, bytes) of every file the dashboard serves, read once from the
    package: a request can only name one of these, never a path."""
    folder = files("taskscheduler.server") / "dashboard"
    found = {}
    for entry in folder.iterdir():
        name = entry.name
        if name == INDEX or _ASSET_NAME.fullmatch(name):
            suffix = name[name.rindex(".") :]
            found[name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    return found


def _serve(request: IRequest, name: str) -> bytes:
    asset = assets().get(name)
    if asset is None:
        raise NOT_FOUND()
    content_type, content = asset
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    # Small files: fetched again on each load, so a server upgrade shows at once.
    request.setHeader(b"Cache-Control", b"no-cache")
    return content


class DashboardRoutes(Routes):
    """The dashboard's page and static files (public; the data behind them is not)."""

    @routes.route("/", methods=["GET"])
    def dashboard(self, request: IRequest) -> bytes:
        return _serve(request, INDEX)

    @routes.route("/dashboard/<asset>", methods=["GET"])
    def dashboard_asset(self, request: IRequest, asset: str) -> bytes:
        if not _ASSET_NAME.fullmatch(asset):  # the page itself is at / only
            raise NOT_FOUND()
        return _serve(request, asset)
