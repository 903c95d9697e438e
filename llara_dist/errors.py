"""Exceptions that mean "the input is wrong", reported by the CLI as one clear message.

Raise these (with the file, the field and what was expected in the message) for problems a user
can fix; let genuine bugs surface as ordinary exceptions with tracebacks.
"""


class LlaraError(ValueError):
    """Base class for user-facing input errors."""


class ConfigError(LlaraError):
    """A configuration file, override or DeepSpeed config is invalid or contradictory."""


class DataError(LlaraError):
    """Input data (raw logs, shards, item tables) is missing, malformed or mismatched."""


class CheckpointError(LlaraError):
    """A checkpoint or export is missing, incomplete or incompatible."""
