"""The base of every error caused by the user's input rather than by a bug, and the interrupt the CLI reports."""


class UserError(Exception):
    """Bad input (config, data, a store, a saved model): the CLI prints it and exits with status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a stage, re-raised with where the stage stopped; the CLI prints it and exits with 130."""
