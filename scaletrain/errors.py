"""One error type for users' mistakes: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """A problem with what the user gave us (config, data, checkpoint, flags), not a bug.

    The message names the problem and, where possible, the fix. It is printed without a
    traceback, so it must stand on its own in one line.
    """

    exit_code = 2
