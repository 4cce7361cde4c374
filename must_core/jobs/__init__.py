"""Adaptation jobs: request/response schemas, the status state machine, queries and task names."""
