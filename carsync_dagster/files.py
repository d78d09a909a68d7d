"""Files written whole or not at all (landing, normalised partitions)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it once the block has written it, so a
    reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)
