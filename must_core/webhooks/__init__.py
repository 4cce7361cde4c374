"""Webhooks: signed job events delivered from a database outbox (see :mod:`.outbox`)."""
