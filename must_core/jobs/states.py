"""Job statuses and the allowed transitions.

queued ──claim──▶ running ──▶ succeeded | failed | cancelled
  │                 │                           │        │
  │                 │                           └─resume─┴──▶ queued   (POST /v1/jobs/{id}/resume)
  │                 └─(worker lost: stale heartbeat, attempts left)──▶ queued   (resumes from checkpoint)
  └─cancel──▶ cancelled
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(StrEnum):
    ADAPT = "adapt"  # MUST adaptation of a base model; produces a model
    PREDICT = "predict"  # batch predictions of an adapted model over a dataset; produces files


RESUMABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})

TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),  # resume
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),  # resume
}


def can_transition(src: str, dst: str) -> bool:
    return JobStatus(dst) in TRANSITIONS[JobStatus(src)]
