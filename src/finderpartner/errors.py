"""Exceptions whose message is meant for the user, and the exit code of each. Only ``cli/`` turns them into
exit codes; ``EXIT_CODES`` is the table that ``finderpartner --help`` and README print (a test keeps them equal).
"""

from __future__ import annotations


class FinderPartnerError(Exception):
    """Base class: the message says what went wrong and what to change."""

    exit_code = 1


class UsageError(FinderPartnerError):
    """The command line itself is wrong (a flag value out of range, an empty prompt, ...)."""

    exit_code = 2


class ConfigError(FinderPartnerError):
    """The configuration (YAML or ``--set`` overrides) is invalid."""

    exit_code = 3


class DataError(FinderPartnerError):
    """The data set (CSV, images, shards) cannot be used as given."""

    exit_code = 4


class ModelError(FinderPartnerError):
    """A model cannot be built, loaded or saved (including pickle weights refused without --trust-pickle)."""

    exit_code = 5


class CheckpointError(FinderPartnerError):
    """A checkpoint cannot be read, or none of a run's checkpoints is usable."""

    exit_code = 6


class TrainingError(FinderPartnerError):
    """Training cannot continue (out of memory at micro-batch 1, non-finite loss, ...)."""

    exit_code = 7


class IndexMismatchError(FinderPartnerError):
    """A gallery index was built by a different model (or another gallery)."""

    exit_code = 8


class ExportError(FinderPartnerError):
    """The ONNX export failed or does not reproduce the PyTorch model."""

    exit_code = 9


class OutputError(FinderPartnerError):
    """An output folder is refused: it holds what this command did not make, it is (inside) an input, or another
    process is using it. Nothing was changed."""

    exit_code = 10


class StorageError(FinderPartnerError):
    """Writing failed (disk full, read-only or no permission). Temporary files were removed; earlier files are intact."""

    exit_code = 11


class Stopped(FinderPartnerError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM after saving the work so far (train: a checkpoint; index: the images
    embedded until then): the same command again continues (train: with --resume auto)."""

    exit_code = 12


INTERNAL_ERROR = 70  # a bug: the traceback is printed with a request to report it
INTERRUPTED = 130  # Ctrl-C or SIGTERM where there was nothing to save (128 + SIGINT)
BROKEN_PIPE = 141  # what a shell reports for a process its reader left (128 + SIGPIPE): `finderpartner ... | head`

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "a check found problems (check-env, validate-data), an optional package is missing, or the port is taken",
    UsageError.exit_code: "usage error: wrong or missing command-line arguments",
    ConfigError.exit_code: "invalid configuration (YAML file or --set)",
    DataError.exit_code: "unusable data (CSV, images, shards, gallery index)",
    ModelError.exit_code: "model cannot be loaded, built or saved (pickle weights without --trust-pickle)",
    CheckpointError.exit_code: "checkpoint unreadable, or no usable checkpoint to resume from",
    TrainingError.exit_code: "training stopped (out of memory at micro-batch 1, repeated non-finite loss)",
    IndexMismatchError.exit_code: "gallery index built by another model",
    ExportError.exit_code: "ONNX export failed or does not match PyTorch",
    OutputError.exit_code: "output refused: it holds other files, is an input, or is in use (nothing changed)",
    StorageError.exit_code: "write failed: disk full or not writable (earlier files intact)",
    Stopped.exit_code: "stopped by Ctrl-C or SIGTERM after saving the work so far: run it again to continue "
    "(train: --resume auto)",
    INTERNAL_ERROR: "internal error (a bug): please report it with the printed traceback",
    INTERRUPTED: "interrupted by Ctrl-C or SIGTERM (nothing half-written kept; earlier files intact)",
    BROKEN_PIPE: "the output's reader stopped reading (e.g. piped into head); the rest of the output was dropped",
}
