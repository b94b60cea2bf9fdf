"""Exception types: every user-facing failure names the file, key or value and the fix."""


class DistribError(Exception):
    """Base for errors caused by bad input or environment; the CLI prints them without a traceback."""


class DataError(DistribError, ValueError):
    """A manifest, image, shard or index is missing, malformed or inconsistent."""


class ConfigError(DistribError, ValueError):
    """A config key or value is invalid; the message names the key, the value and the fix."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal other than SIGINT (e.g. SIGTERM); ``signum`` gives the exit code 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
