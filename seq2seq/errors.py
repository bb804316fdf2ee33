class UserError(Exception):
    """A problem with the user's input (file, flag, config): shown as one line, no traceback."""
