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


MAX_LISTED = 15  # a longer list of valid names is cut to the nearest ones


def valid_names(value: object, valid, see: str | None = None) -> str:
    """The tail of a message about a name not among `valid`: '; valid: a, b, ...', led by
    ' (did you mean 'x'?)' when one valid name is a typo away from it. A long list is cut to the few nearest
    names, and `see` says where the whole list is (e.g. "`stepbench methods`")."""
    names = [str(v) for v in valid]
    word = str(value)
    allowed = max(1, len(word) // 4)  # 'dpmpp2m' -> 'dpmpp_2m', 'roh' -> 'rho'; not 'sd3' -> 'svd'
    distances = {name: _typo_distance(word, name) for name in names}
    close = sorted((d, name) for name, d in distances.items() if d <= allowed)
    hint = f" (did you mean {close[0][1]!r}?)" if close else ""
    if len(names) <= MAX_LISTED:
        return f"{hint}; valid: {', '.join(names) or 'none'}"
    nearest = sorted(names, key=lambda name: (distances[name], name))[:5]
    where = f"; see {see}" if see else ""
    return f"{hint}; nearest valid: {', '.join(nearest)} ({len(names)} in all{where})"


def _typo_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn a into b."""
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]
