"""Domain errors with stable codes. No HTTP here: the API maps codes to statuses."""

from __future__ import annotations


class MustError(Exception):
    """Base class for every expected failure. ``code`` is stable and machine-readable."""

    code: str = "must_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidConfigError(MustError):
    """A hyperparameter or option is out of range or inconsistent."""

    code = "invalid_config"


class ModelLoadError(MustError):
    """The base model or an adapted model cannot be built or loaded."""

    code = "model_load_failed"


class DatasetError(MustError):
    """The dataset cannot be used (empty, unreadable, wrong layout)."""

    code = "dataset_invalid"


class EmptyDatasetError(DatasetError):
    """No decodable image was found."""

    code = "dataset_empty"


class TrainingDivergedError(MustError):
    """The loss became non-finite."""

    code = "training_diverged"


class CheckpointError(MustError):
    """A checkpoint is missing, corrupt or belongs to another run."""

    code = "checkpoint_invalid"
