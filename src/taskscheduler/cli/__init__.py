"""The ``taskscheduler`` command: the operators' verbs over the server's REST API only.

A synchronous program (click for the verbs, httpx for HTTP): nothing here imports the
server or the agent, so it runs wherever it can reach the API.
"""
