"""Errors that are the user's to fix: shown as one clear message and a non-zero exit, no traceback."""


class GolfError(Exception):
    """Bad input (a file, shard, or config key): the message says what, where, and what to do."""

    exit_code = 1


class ConfigError(GolfError):
    """An unknown config key, a wrong type or an impossible value: exit status 2, before any work."""

    exit_code = 2


class DataError(GolfError):
    """Missing, mismatched or undecodable data: the message names the file or shard."""
