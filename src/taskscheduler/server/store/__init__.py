"""The server's storage, split by domain as Buildbot splits its ``DBConnector``.

``interface`` (the Store protocol, its records and exceptions) and ``rules`` (the pure
decisions every store and the API share); ``postgres`` (the real store, a facade over
``pool``, ``migrations`` and one component per domain: ``tasks``, ``deliveries``,
``results``, ``agents``, ``audit``); ``memory`` (the in-memory store of unit tests).
"""
