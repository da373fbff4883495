"""The one exception type that the CLI turns into a single clear line and a non-zero exit code, and the one
warning type it prints as a single line."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a dataset): the message names it and says what is wrong.

    The CLI prints `fullres: error: <message>` on stderr, without a traceback, and exits with `exit_code`.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" for none): what a one-line refusal quotes of it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


class OneLineWarning(UserWarning):
    """A warning about the user's job that the CLI prints as one line, `fullres COMMAND: warning: <message>`."""
