"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class RlnfError(Exception):
    """Base class of every error a user can fix (bad config, bad data, bad checkpoint)."""


class ConfigError(RlnfError):
    """A config key or value is wrong; the message names the key."""


class DataError(RlnfError):
    """A manifest line or an audio file is unusable; the message names the file and line."""


class RewardError(RlnfError):
    """A reward returned something unusable (NaN, inf, out of [0, 1], wrong shape)."""


class CheckpointError(RlnfError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file or tensor."""


class TrainingInterrupted(RlnfError):
    """SIGINT/SIGTERM: the step in flight finished, a checkpoint was written, and the run stopped."""
