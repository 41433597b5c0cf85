"""The taskscheduler server: REST API, storage and dispatch to agents."""
