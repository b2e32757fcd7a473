"""Small shared helpers: atomic writes with the permissions of any file the user writes.

tempfile.mkdtemp/mkstemp create private 0700/0600 entries, which would leak into the published
checkpoint, dataset or cache (an evaluation job running as another user could not read them), so
everything published here gets the umask's normal modes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_directory(target: str | Path) -> Path:
    """A fresh temporary folder beside `target`, named `.{name}.tmp-*` (see publish_directory)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))


def publish_directory(staged: str | Path, target: str | Path) -> Path:
    """Make `staged` durable and readable, then put it at `target` in one rename.

    An existing `target` is first moved aside to `.{name}.old-{pid}` and deleted after the rename,
    so a crash leaves the old folder, the new one, or (between the two renames) the old one under
    its aside name, which recover_aside() puts back; never a half-written mix.
    """
    staged, target = Path(staged), Path(target)
    mask = _umask()
    for folder, _, files in os.walk(staged):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, aside)
    os.replace(staged, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def recover_aside(folder: str | Path, pattern: str = "*") -> int:
    """After a crash in publish_directory: restore or delete `.{name}.old-*` and `.{name}.tmp-*` folders.

    An aside copy whose target is missing is the only copy left, so it is renamed back; every
    other leftover is deleted. Returns how many leftovers were handled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    handled = 0
    for aside in folder.glob(f".{pattern}.old-*"):
        target = folder / aside.name[1:].rsplit(".old-", 1)[0]
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, target)
        handled += 1
    for staged in folder.glob(f".{pattern}.tmp-*"):
        shutil.rmtree(staged, ignore_errors=True)
        handled += 1
    return handled


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (publish_directory)."""
    staged = staging_directory(target)
    try:
        yield staged
        publish_directory(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a durable temporary sibling and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
