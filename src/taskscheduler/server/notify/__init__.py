"""Webhooks: when one is due (:mod:`.rules`), what it says and how it is signed
(:mod:`.payload`), and the service that sends them (:mod:`.notifier`)."""
