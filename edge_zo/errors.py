"""The exceptions edge-zo raises.

Each subclass also derives from the matching builtin, so callers may catch
either `edge_zo.errors.InvalidInputError` or plain `ValueError`.
"""


class EdgeZoError(Exception):
    """Base of every error edge-zo raises on purpose."""


class InvalidInputError(EdgeZoError, ValueError):
    """A file, argument or record is malformed; the message says where and what to do."""


class ModelFileError(EdgeZoError, OSError):
    """A model or adapter file is missing, unreadable or corrupt."""


class IncompatibleAdapterError(InvalidInputError):
    """An adapter does not fit the model it is attached to."""


class NativeRuntimeError(EdgeZoError, RuntimeError):
    """llama.cpp or the native core failed while running."""


class NativeBuildError(EdgeZoError, ImportError):
    """The compiled extension is missing or does not load."""


class WorkerLostError(EdgeZoError, RuntimeError):
    """A worker of a distributed run died, hung past the timeout, or never joined."""


class DivergedError(EdgeZoError, FloatingPointError):
    """Training produced a non-finite loss or values beyond what a sparse adapter stores.

    `step` is the last finite step: the state handed to the loop has been put back there.
    `before_training`: the losses were not finite before any step (the model or data, not the lr)."""

    def __init__(self, message: str, step: int, before_training: bool = False):
        super().__init__(message)
        self.step = step
        self.before_training = before_training


class RunLockedError(EdgeZoError, BlockingIOError):
    """Another process is writing the same run folder."""
