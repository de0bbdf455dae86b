"""The exceptions a command turns into one line on stderr and an exit code, and the CLI wrapper that does it:
``UserError`` (a mistake the user can fix: exit 2) and ``DiskFull`` (a write found no space: exit 4)."""

from __future__ import annotations

import errno
import functools
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input: the message names the problem and the fix; the CLI prints it and exits with code 2."""


class DiskFull(Exception):
    """A write ran out of space (ENOSPC, EDQUOT): the message names the folder, what was being written and how
    much; the CLI prints it and exits with code 4."""


# how the libraries that write for the engine report a full disk when they do not raise an OSError with its errno:
# safetensors (Rust's io::Error), torch.save (PytorchStreamWriter), Pillow and PyAV (their own messages)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "storagefull",
                   "file write failed")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, DiskFull):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def _size(nbytes: int) -> str:
    return f"{nbytes} B" if nbytes < 1024 else f"{nbytes / 1024:.0f} KiB" if nbytes < 2 ** 20 else f"{nbytes / 2 ** 20:.1f} MiB"


def disk_full_message(path: str | Path, what: str, nbytes: int | None = None) -> str:
    """One line: which folder's disk is full, what was being written there and how much, what is free."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        free = f", {_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    size = f" ({_size(nbytes)})" if nbytes is not None else ""
    return f"the disk holding {folder} is full: writing {what}{size} failed{free}; free space there or pass another --output"


@contextmanager
def disk_writes(path: str | Path, what: str, nbytes: int | None = None, cleanup=None):
    """Writes to ``path`` inside: on any error ``cleanup()`` runs first (a partial file removed or cut back, so the
    free space reported is what a retry finds), then a full disk becomes ``DiskFull`` naming it (other errors pass
    through)."""
    try:
        yield
    except BaseException as err:
        if cleanup is not None:
            cleanup()
        if isinstance(err, DiskFull) or not is_disk_full(err):
            raise
        raise DiskFull(disk_full_message(path, what, nbytes)) from None


def cli_entry(main):
    """Wrap a command's main() so a UserError becomes one stderr line and exit code 2, and a full disk (``DiskFull``,
    or a writer's own disk-full error) one line and exit code 4."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as err:
            if not is_disk_full(err):
                raise
            message = str(err) if isinstance(err, DiskFull) else \
                f"the disk is full ({first_line(err)}); free space or pass another --output"
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(4) from None

    return wrapper


def first_line(err: Exception) -> str:
    """An exception's first line of text (its type's name when it has none): the reason inside a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
