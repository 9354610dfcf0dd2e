"""The one exception type the library raises for problems a user can fix."""


class KitError(Exception):
    """A user-fixable problem. The message is one line: what is wrong, where, and how to fix it.

    The CLI prints it without a traceback and exits with `exit_code`.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
