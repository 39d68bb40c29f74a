"""The exception type for expected failures that the command-line tools report in one line."""


class UserError(Exception):
    """Bad input or a missing file: the message names the value or file and how to fix it.

    The command-line entry points catch this type, log the message without a traceback and exit
    with status 2. Anything else is a bug and keeps its traceback.
    """
