"""The error types a user sees. The CLI prints one line for these and exits 2; anything else is a bug."""


class EvoError(Exception):
    """Base of the errors caused by user input (config, data, checkpoint, command line)."""


class ConfigError(EvoError):
    """A config value is missing, of the wrong type, or impossible."""


class DataError(EvoError):
    """A data folder, file or record cannot be used."""


class CheckpointError(EvoError):
    """A checkpoint is missing, incomplete or does not match the model."""
