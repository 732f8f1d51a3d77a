"""The exceptions maskseg raises for problems a user can fix; cli (maskseg.cli.main) turns them into exit codes."""

from __future__ import annotations

from pathlib import Path


class MasksegError(Exception):
    """Base class: a problem with the user's input, files or environment, stated in one line."""

    exit_code: int = 1


class UsageError(MasksegError):
    """Options that contradict each other or name things that do not exist."""

    exit_code = 2


class SourceError(MasksegError):
    """An input path, glob or list file that cannot be used at all."""

    exit_code = 2


class DecodeError(MasksegError):
    """One image could not be read; the run records it and goes on."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UndecodableError(DecodeError):
    """Bytes read whole and unchanged that are no usable image. ``size``/``mtime_ns`` describe those
    bytes, so the failure is recorded against what was read (a file rewritten since the scan is not
    retried once more for nothing)."""

    def __init__(self, path: str, reason: str, size: int, mtime_ns: int) -> None:
        super().__init__(path, reason)
        self.size = size
        self.mtime_ns = mtime_ns


class LabelMapError(UsageError):
    """A label map file that cannot be read or is not a valid ``StringIntLabelMap`` (exit 2)."""


class EvalInputError(MasksegError):
    """An annotation or results file that cannot be evaluated as it is (exit 1)."""


class WeightsError(MasksegError):
    """Model weights that are missing, unsafe or do not fit the architecture."""


class ModelOutputError(WeightsError):
    """A model whose outputs hold values no export layout maskseg reads can hold (boxes outside [0, 1]
    where normalised boxes are expected, NaNs): the run stops, it never writes what it misread."""


class ExportError(MasksegError):
    """An exported model that disagrees with the original on the check images, or cannot be made."""


class WriterError(MasksegError):
    """An unknown writer name, a writer that fails to load, or an output that cannot be written."""


class OutputError(MasksegError):
    """The output folder cannot be used (a file, inside the input, not writable, disk full)."""


class LockedError(MasksegError):
    """Another run holds the output folder's lock (exit 75, EX_TEMPFAIL: cron's "try later")."""

    exit_code = 75


class Interrupted(MasksegError):  # noqa: N818 - a state, not a failure
    """The run was stopped by SIGINT or SIGTERM after writing consistent outputs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}; outputs are consistent, rerun to resume")
        self.exit_code = 128 + signum
