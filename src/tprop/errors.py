"""The errors that report a user's mistake in one line (exit status 2 on the command line).

Torch-free, so that the command line can name them without importing the library.
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what it accepts."""


class CorpusError(ValueError):
    """A corpus cannot be found, read or tokenised; the message says what to do."""


class RunDirError(ConfigError):
    """A run directory cannot be used as asked (damaged or foreign files, another writer, a
    write that failed); the message names the file and what to do."""


class RunLocked(RunDirError):
    """Another process is writing the run directory."""


class DiskFull(RunDirError):
    """A file of a run directory could not be written because its disk is full; the files
    written before are intact."""


class SigTerm(KeyboardInterrupt):
    """SIGTERM arrived in a one-process ``tprop train``: it stops the run as Ctrl-C does."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CorpusError, FileNotFoundError)
