"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from agent.errors import LeptonError
from agent.statefiles import fsync_dir


def write_together(files: dict[Path, bytes]) -> None:
    """Write each file to a temporary beside it, fsync, then rename all into place; nothing half-written."""
    temporaries: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            temporaries[path] = Path(name)
            os.fchmod(fd, 0o644)  # mkstemp makes it private; a model file is not a secret
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
        for folder in {p.parent for p in files}:
            fsync_dir(folder)
    except OSError as exc:
        raise LeptonError(f"cannot write {exc.filename or ', '.join(map(str, files))}: {exc.strerror}") from None
    finally:
        for temporary in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
