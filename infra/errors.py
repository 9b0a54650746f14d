"""The base of every error caused by the user's input rather than by a bug."""


class UserError(Exception):
    """Bad input (config, data, a store, a saved model): the CLI prints it and exits with status 2."""
