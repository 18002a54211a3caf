"""Atomic output: files are written into a hidden folder beside their destination and
moved into place with `os.replace` only once complete.

A failure (an exception, a full disk, a folder that cannot be written) leaves the
destination as it was, removes the staging folder and any folder made for the output,
and becomes one `RescompileError` line. A writer killed outright (SIGKILL, power loss)
cannot clean up: its staging folder is removed by the next write into the same folder
once its process is gone and the folder is older than `STALE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rescompile.errors import RescompileError

__all__ = ["staging_dir", "TEMP_PREFIX", "STALE_SECONDS"]

TEMP_PREFIX = ".rescompile-"
# NOTE: the age bound keeps the sweep off the staging folder of a live writer on another
# machine sharing the folder, whose process id means nothing here.
STALE_SECONDS = 3600.0


@contextlib.contextmanager
def staging_dir(path: Path) -> Iterator[Path]:
    """A fresh staging folder beside `path`; the caller writes there and `os.replace`s into place.

    Raises:
        RescompileError: `cannot write PATH: reason` for any OSError (including the
            RescompileErrors the caller raises, which pass through unchanged).
    """
    parent = path.resolve().parent
    made = _missing_ancestors(parent)
    existing = made[-1].parent if made else parent
    if not existing.is_dir():
        raise RescompileError(f"cannot write {path}: {existing} is a file, not a folder")
    tmpdir = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(parent)
        tmpdir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent))
        yield tmpdir
    except BaseException as exc:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            tmpdir = None
        for folder in made:  # deepest first; stops at one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            raise RescompileError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _missing_ancestors(folder: Path) -> list[Path]:
    """The folders that mkdir(parents=True) would create for `folder`, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _sweep_stale(parent: Path) -> None:
    now = time.time()
    for entry in parent.glob(TEMP_PREFIX + "*"):
        pid = entry.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or _alive(int(pid)) or now - entry.lstat().st_mtime < STALE_SECONDS:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
