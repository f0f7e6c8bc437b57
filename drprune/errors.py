"""Errors the user can fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input (config, path, checkpoint); the message names the problem and the fix."""


class ConfigError(UserError):
    """A config key holds a value we cannot use; raised before any heavy work starts."""
