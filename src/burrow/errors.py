"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and how to fix it.

    The CLI prints it as a single line on stderr and exits with status 2.
    """
