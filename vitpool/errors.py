"""The one exception type the CLI turns into a one-line message and exit code 2."""


class VitpoolError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def refuse_existing_output(path, force: bool) -> None:
    """Outputs are never overwritten silently: an existing path needs --force."""
    if not force and path.exists():
        raise VitpoolError(f"output {path} already exists; choose another path or pass --force to replace it")
