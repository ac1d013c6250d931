"""Atomic output folders: write into a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from signround.errors import SignRoundError


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Refuse an output that exists and is not empty (unless ``overwrite``) or that is a file.

    Call it before any long work so a run never fails only at the end.
    """
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise SignRoundError(f"output {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SignRoundError(f"output folder {out} is not empty; pass --overwrite or choose another folder")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SignRoundError(f"cannot write to {probe}: permission denied; choose another output folder")
    return out


@contextlib.contextmanager
def atomic_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``output``; on success it replaces ``output`` in one rename.

    On any error the temporary folder is removed and ``output`` keeps its previous content.
    """
    out = check_output(output, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a writer that was killed (two writers of one output path are not supported).
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise SignRoundError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SignRoundError(f"disk full while writing {out}; free space and run again") from None
        raise SignRoundError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
