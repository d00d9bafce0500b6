"""The one exception type the CLI turns into a one-line message and exit code 2, and the checks and writes
every output goes through (never overwritten silently, never half-written)."""

import os
import tempfile
from pathlib import Path


class VitpoolError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def refuse_existing_output(path, force: bool) -> None:
    """Outputs are never overwritten silently: an existing path needs --force."""
    if not force and path.exists():
        raise VitpoolError(f"output {path} already exists; choose another path or pass --force to replace it")


def writable_parent(path) -> None:
    """Create the folder an output goes in; one clear line if that or writing there is impossible."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitpoolError(f"cannot write {path}: {error.strerror or error} ({error.filename or parent})") from None
    if not os.access(parent, os.W_OK):
        raise VitpoolError(f"cannot write {path}: no permission to write in {parent}")


def normal_mode(directory: bool = False) -> int:
    """The permissions a plain open() or mkdir() gives under the current umask (temporary files start private)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write a uniquely named temporary sibling, then rename it into place: a reader never sees half a file,
    and concurrent writers never share a temporary file."""
    path = Path(path)
    writable_parent(path)
    data = text.encode() if isinstance(text, str) else text
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        raise VitpoolError(f"cannot write {path}: {error.strerror or error}") from None
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        temporary.chmod(normal_mode())
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise VitpoolError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
