"""Exceptions whose message is meant for the user. Only ``cli.py`` turns them into exit codes."""


class FinderPartnerError(Exception):
    """Base class: the message says what went wrong and what to change."""

    exit_code = 1


class ConfigError(FinderPartnerError):
    """The configuration (YAML or ``--set`` overrides) is invalid."""

    exit_code = 2


class DataError(FinderPartnerError):
    """The data set (CSV, images, shards) cannot be used as given."""

    exit_code = 3


class ModelError(FinderPartnerError):
    """A model cannot be built, loaded or saved."""

    exit_code = 4


class CheckpointError(FinderPartnerError):
    """A checkpoint cannot be written or read."""

    exit_code = 5


class TrainingError(FinderPartnerError):
    """Training cannot continue (out of memory at micro-batch 1, non-finite loss, ...)."""

    exit_code = 6
