"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class StepbenchError(Exception):
    """Bad input or a missing resource; the message is the whole story, in one line."""


class ConfigError(StepbenchError):
    """A config file is malformed or names something that does not exist."""


class UnsupportedNFE(StepbenchError):
    """A method cannot meet the requested NFE budget exactly."""
