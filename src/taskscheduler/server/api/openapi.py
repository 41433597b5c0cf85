"""The route that serves the API's own description (:mod:`taskscheduler.server.openapi`)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.openapi import document_bytes


class OpenAPIRoutes(Routes):
    """The OpenAPI document: public, so that tools and people can read it before they
    hold a credential."""

    @routes.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return document_bytes()
