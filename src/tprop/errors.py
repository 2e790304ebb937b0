"""The errors that report a user's mistake in one line (exit status 2 on the command line).

Torch-free, so that the command line can name them without importing the library.
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what it accepts."""


class CorpusError(ValueError):
    """A corpus cannot be found, read or tokenised; the message says what to do."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CorpusError, FileNotFoundError)
