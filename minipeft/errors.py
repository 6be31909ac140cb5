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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary (TRAIN-20). A KeyboardInterrupt, so code that does not
    catch it stops as on any Ctrl-C; `step`, `checkpoint` (the folder saved, or None without an output_dir)
    and `history` say where it stopped and how to go on (resume_from=checkpoint)."""

    def __init__(self, step: int, checkpoint, history: dict):
        where = f"; checkpoint saved: {checkpoint}" if checkpoint else "; no output_dir, so no checkpoint"
        super().__init__(f"training interrupted after step {step}{where}")
        self.step, self.checkpoint, self.history = step, checkpoint, history
