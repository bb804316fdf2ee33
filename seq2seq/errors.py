class UserError(Exception):
    """A problem with the user's input (file, flag, config): shown as one line, no traceback."""


class Interrupted(Exception):
    """A run stopped by a signal after saving its state: a message and the exit status to give."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
