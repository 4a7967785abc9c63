"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """A mistake the user can fix; the message names the file and line (or key) and the fix."""


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the fix."""
