"""Values computed from files (parsed annotations, image headers), cached on disk per folder.

Each entry is validated by its file's ``(mtime_ns, size)``: a changed file is always recomputed,
so a stale entry is never used. A cache that cannot be read is ignored; one that cannot be written
only logs a warning (a read-only home must not stop training).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# bumped whenever what an entry holds changes, so an older cache is recomputed, never misread
CACHE_VERSION = 2


def cache_dir() -> Path:
    return Path(os.environ.get("SSD_CACHE_DIR", Path.home() / ".cache" / "ssd"))


class StatCache:
    """``compute(path)`` for the files of one folder, stored in ``<cache_dir>/<kind>-<folder hash>.pkl``."""

    def __init__(self, kind: str, folder: Path, compute: Callable[[Path], Any]) -> None:
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir() / f"{kind}-{key}.pkl"
        self.compute = compute
        self.entries: dict[str, tuple[int, int, Any]] = {}
        self.dirty = False
        try:
            with open(self.path, "rb") as f:
                data = pickle.load(f)
            if data.get("version") == CACHE_VERSION:
                self.entries = data["entries"]
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, KeyError, TypeError):
            self.entries = {}

    def get(self, path: Path) -> Any:
        st = path.stat()
        hit = self.entries.get(path.name)
        if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            return hit[2]
        value = self.compute(path)
        self.entries[path.name] = (st.st_mtime_ns, st.st_size, value)
        self.dirty = True
        return value

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump({"version": CACHE_VERSION, "entries": self.entries}, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as e:
            log.warning("could not write the index cache %s: %s", self.path, e)
