"""The checks and writes every output goes through: never overwritten silently, never half-written, never a
temporary file shared by two writers, and what a killed writer left is cleaned up by the next one."""

import os
import re
import shutil
import tempfile
from pathlib import Path

from vitpool.errors import VitpoolError

NAME_MAX, PATH_MAX = 255, 4095  # bytes, as Linux and macOS file systems allow


def check_output_name(path) -> None:
    """One line for an output path the file system would refuse for its length (before anything touches it)."""
    path = Path(path)
    name, full = len(os.fsencode(path.name)), len(os.fsencode(os.path.abspath(path)))
    if name > NAME_MAX:
        raise VitpoolError(f"output name {path.name[:40]}... is {name} bytes; file names are at most {NAME_MAX}: choose a shorter one")
    if full > PATH_MAX:
        raise VitpoolError(f"output path is {full} bytes; paths are at most {PATH_MAX}: choose a shorter one")


def refuse_existing_output(path, force: bool) -> None:
    """Outputs are never overwritten silently: an existing path needs --force."""
    path = Path(path)
    check_output_name(path)
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


def temporary_prefix(path) -> str:
    """`.NAME.PID.`, the start of this process's temporaries for `path`: a later writer of `path` can then tell
    what a writer that died (kill -9) left from what a running one is writing."""
    return f".{Path(os.path.abspath(path)).name[:200]}.{os.getpid()}."


def remove_leftovers(path) -> None:
    """Remove the temporaries (`.tmp`, `.partial`, `.old`) that writers of `path` no longer running left beside it."""
    path = Path(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{path.name[:200]}.") + r"(\d+)\.[a-z0-9_]+\.(tmp|partial|old)$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and not _running(int(match.group(1))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process
    return True


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write a uniquely named temporary sibling, then rename it into place: a reader never sees half a file,
    and concurrent writers never share a temporary file."""
    path = Path(path)
    check_output_name(path)
    writable_parent(path)
    remove_leftovers(path)
    data = text.encode() if isinstance(text, str) else text
    try:
        handle, name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".partial", dir=path.parent)
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
