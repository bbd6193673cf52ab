"""The one exception type for mistakes a user can fix.

The CLI prints a `GptcliError` as a single `error: ...` line and exits with code 2;
any other exception is a bug and keeps its traceback.
"""


class GptcliError(Exception):
    """A problem with the user's input (config, data, paths, options), not a bug."""
