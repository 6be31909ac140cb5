"""minipeft's exceptions. Every error a user can cause is one of these, and its message says
what was wrong, where (file, key, field) and what to do."""


class MiniPeftError(Exception):
    """Base class of every minipeft error."""


class ConfigError(MiniPeftError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class CheckpointError(MiniPeftError):
    """A checkpoint or adapter file is missing, malformed or does not fit the model."""


class BackendError(MiniPeftError):
    """The requested array backend is unknown or not installed."""


class TrainingError(MiniPeftError):
    """Training hit a state it cannot continue from (NaN loss, bad data)."""
