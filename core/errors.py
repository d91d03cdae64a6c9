"""The one exception type for bad input: its message is a single sentence shown to the user as is."""


class UserError(ValueError):
    """Bad input (prompt, subject, model, file, option); nothing was changed."""
