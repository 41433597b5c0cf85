"""The server's REST API: :mod:`.app` composes the route modules into one Klein app."""
