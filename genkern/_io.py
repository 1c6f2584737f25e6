"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

A write goes to a temporary beside its target, named ".<target>.<random>.tmp" (tempfile's
mkstemp/mkdtemp, as genkern.train.checkpoint names its checkpoint directories too), then
replaces the target. A writer killed mid-write (SIGKILL, power loss) leaves that temporary
behind: `temp_target` recognises one and `remove_temp_files` clears them. `locked` serialises
the read-modify-write of a file shared by several processes (benchmark results).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

# tempfile's names: prefix + random letters, digits and "_" + suffix.
_TEMP = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{6,16}\.tmp")


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it replaces `path` (after an
    fsync), on any error it is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: bytes | str) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def temp_target(name: str) -> str | None:
    """The target whose atomic write `name` is the temporary of (".log.json.k2x9_a1b.tmp" -> "log.json"), or None."""
    match = _TEMP.fullmatch(name)
    return match["target"] if match else None


def remove_temp_files(directory, is_target) -> list:
    """Removes the temporaries that interrupted atomic writes left in `directory`: the entries named as
    `temp_target` describes whose target satisfies `is_target(target name)` (plain files, and directories
    for checkpoints; never a link or anything else). Only the names of the writers' own targets are
    passed, so a user's file is never touched. Returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        target = temp_target(entry.name)
        if target is None or not is_target(target) or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        else:
            continue
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def locked(path):
    """Holds an exclusive lock (fcntl.flock) on ".<name>.lock" beside `path` for the duration of the block.

    Every process that reads, changes and rewrites `path` under it sees the others' changes: none is
    lost. The lock file is removed on release; a process that locked a file another one removed
    meanwhile retries on the current one, so two holders never overlap.
    """
    import fcntl  # POSIX only: imported where it is used

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.stat(lock)
        except FileNotFoundError:  # removed by the holder before us: lock the next one
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # releases the lock
