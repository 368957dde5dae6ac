"""Output paths, checked before the long work starts: a calibration or an export that runs for minutes must not
fail at its last step because its output cannot be written."""
from __future__ import annotations

import os
from pathlib import Path

from bamboo.errors import InputError


def prepare_output(path, what: str) -> Path:
    """`path`, with its missing parent directories created, after checking that a file can be written there."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write the {what} to {path}: it is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write the {what} to {path}: its directory {path.parent} cannot be created "
                         f"({exc.strerror}); choose a writable path") from None
    probe = path.parent / f".bamboo-write-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the {what} to {path}: directory {path.parent} is not writable "
                         f"({exc.strerror}); choose a writable path") from None
    return path
