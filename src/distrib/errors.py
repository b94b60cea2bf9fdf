"""Exception types: every user-facing failure names the file, key or value and the fix."""


class DistribError(Exception):
    """Base for errors caused by bad input or environment; the CLI prints them without a traceback."""


class DataError(DistribError, ValueError):
    """A manifest, image, shard or index is missing, malformed or inconsistent."""


class ConfigError(DistribError, ValueError):
    """A config key or value is invalid; the message names the key, the value and the fix."""
