"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class StepbenchError(Exception):
    """Bad input or a missing resource; the message is the whole story, in one line."""


class ConfigError(StepbenchError):
    """A config file is malformed or names something that does not exist."""


class UnsupportedNFE(StepbenchError):
    """A method cannot meet the requested NFE budget exactly.

    `reason` is the short form shown in the leaderboard's n/a cells."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message
