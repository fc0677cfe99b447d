"""Errors that name where the bad input is.

They pickle with their fields (``__reduce__``), so a worker process can raise one and its parent re-raise the
same error (an exception pickles by its ``args``, which here hold the joined message, not the two fields).
"""


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range.

    ``path`` is the dotted key path inside the config (``kdqat.quant.groups[2].bits``); the message says what
    was found and what is allowed.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):
        return (type(self), (self.path, self.message))


class DataError(ValueError):
    """A data file is malformed. ``source`` is ``file`` or ``file:line``."""

    def __init__(self, source: str, message: str):
        self.source = source
        self.message = message
        super().__init__(f"{source}: {message}")

    def __reduce__(self):
        return (type(self), (self.source, self.message))


class OutputFolderError(ConfigError):
    """The output folder cannot be used as asked: it holds files ds-kdqat did not write, another job holds
    it, or it holds a run with another config. Nothing in the folder was changed."""
