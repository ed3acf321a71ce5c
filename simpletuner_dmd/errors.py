"""Two kinds of failure: a user's mistake (one clear line, exit status 2) and a bug (a traceback).

Everything a user can fix by editing a config, a path or a dataset raises `UserError` (or a subclass).
The CLI prints `error: <message>` for those and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix: bad config, missing file, corrupt media, unknown plugin name."""

    exit_code = 2


class ConfigError(UserError):
    """One or more config problems, reported together, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:  # one line per problem, each already naming its key
        return "\n".join(self.problems)


class DataError(UserError):
    """The dataset is empty, unreadable or holds a corrupt media file."""


class PluginError(UserError):
    """A plugin is unknown, duplicated or broken."""


def print_user_error(error: UserError) -> None:
    """``error: …`` on stderr, one line per problem (a ``ConfigError`` holds several): how every front end — the CLI,
    the SimpleTuner launcher and the ``simpletuner train`` hook — shows a user error."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"error: {line}", file=sys.stderr, flush=True)
