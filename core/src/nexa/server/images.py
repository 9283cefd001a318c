"""Generated images kept for ``response_format: url``: a bounded folder of PNG files.

Files live for ``image_ttl`` seconds and the folder never holds more than
``image_store_bytes``; the oldest go first. Names are random, so a URL can't be guessed.
"""

from __future__ import annotations

import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

NAME_RE = re.compile(r"^[0-9a-f]{32}\.png$")


class ImageFiles:
    def __init__(self, folder: Path | None, ttl: float, max_bytes: int):
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="nexa-images-"))
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def save(self, png: bytes) -> str:
        name = secrets.token_hex(16) + ".png"
        with self._lock:
            (self.folder / name).write_bytes(png)
            self._prune()
        return name

    def path(self, name: str) -> Path | None:
        if not NAME_RE.match(name):
            return None
        path = self.folder / name
        if not path.is_file() or time.time() - path.stat().st_mtime > self.ttl:
            return None
        return path

    def _prune(self) -> None:
        now = time.time()
        files = sorted(
            (p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob("*.png")
        )
        total = sum(size for _, size, _ in files)
        for mtime, size, path in files:
            if now - mtime > self.ttl or total > self.max_bytes:
                path.unlink(missing_ok=True)
                total -= size
