"""Stored ``/v1/responses`` answers: SQLite in the store folder (``responses.db``).

Each row is one response: its ``response`` object (what ``GET /v1/responses/{id}``
returns), the input items of its request, and the id of the response it continued. A
continuation (``previous_response_id``) reads the whole chain back in one recursive
query: earlier inputs and outputs, oldest first. Instructions are not carried over, as
in OpenAI's API.

- Safety: one connection, used only by this store's own worker thread (the standard
  library's ``sqlite3``, off the event loop); WAL journal and a busy timeout, so another
  server process on the same store waits instead of failing. Rows survive restarts.
- Bounds: rows older than ``ttl`` seconds are not returned and are deleted, and beyond
  ``max_count`` rows the oldest go, at every write.
- Access: a row belongs to the API key it was written under (a salted SHA-256 of the key,
  never the key). It is returned only to a request made under the same key: with no key
  configured, rows written under a key stay unreadable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs

from nexa.errors import BadRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    previous_id TEXT,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_CHAIN = """
WITH RECURSIVE chain(id, previous_id, input_items, response, depth) AS (
    SELECT id, previous_id, input_items, response, 0 FROM responses
        WHERE id = ? AND owner = ? AND created_at >= ?
    UNION ALL
    SELECT r.id, r.previous_id, r.input_items, r.response, chain.depth + 1 FROM responses r
        JOIN chain ON r.id = chain.previous_id
        WHERE r.owner = ? AND r.created_at >= ? AND chain.depth < ?
)
SELECT id, previous_id, input_items, response FROM chain ORDER BY depth DESC
"""
MAX_CHAIN = 100_000
"""Responses one conversation may chain at most (a guard against a cycle)."""


@attrs.frozen
class StoredResponse:
    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_id: str | None = None


class ResponseStore:
    """The stored responses of one server."""

    def __init__(self, path: Path, *, ttl: float, max_count: int, api_key: str | None) -> None:
        self.path = path
        self.ttl = ttl
        self.max_count = max_count
        self._api_key = api_key
        self._owner: str | None = None
        self._db: sqlite3.Connection | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexa-responses")

    # --- the worker thread ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created private before SQLite opens it: stored answers are the user's data.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('salt', ?)", (secrets.token_hex(16),))
            salt = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0]
            key = self._api_key or ""
            self._owner = hashlib.sha256(f"{salt}:{key}".encode()).hexdigest() if key else ""
            self._db = db
        return self._db

    def _oldest_kept(self) -> float:
        return time.time() - self.ttl

    def _put(self, record: StoredResponse) -> None:
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, previous_id, created_at, response, input_items) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, self._owner, record.previous_id, time.time(),
                 json.dumps(record.response, ensure_ascii=False), json.dumps(record.input_items, ensure_ascii=False)),
            )
            db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest_kept(),))
            db.execute(
                "DELETE FROM responses WHERE id IN "
                "(SELECT id FROM responses ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (self.max_count,),
            )

    def _get(self, response_id: str) -> StoredResponse | None:
        db = self._connect()
        row = db.execute(
            "SELECT id, previous_id, input_items, response FROM responses "
            "WHERE id = ? AND owner = ? AND created_at >= ?",
            (response_id, self._owner, self._oldest_kept()),
        ).fetchone()
        return None if row is None else _record(row)

    def _chain(self, response_id: str) -> list[StoredResponse]:
        db = self._connect()
        oldest = self._oldest_kept()
        rows = db.execute(_CHAIN, (response_id, self._owner, oldest, self._owner, oldest, MAX_CHAIN)).fetchall()
        return [_record(row) for row in rows]

    def _delete(self, response_id: str) -> bool:
        db = self._connect()
        with db:
            cursor = db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, self._owner))
        return cursor.rowcount > 0

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- the async interface -------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def put(self, record: StoredResponse) -> None:
        await self._call(self._put, record)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._call(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await self._call(self._delete, response_id)

    async def history(self, response_id: str) -> list[dict[str, Any]]:
        """The items of the conversation up to and including ``response_id``'s answer,
        oldest first: each response's input items, then its output items."""
        chain = await self._call(self._chain, response_id)
        if not chain or chain[-1].id != response_id:
            raise BadRequest(f"previous response {response_id!r} is not stored here (never stored, deleted, "
                             "or past the store's age or count limit)", param="previous_response_id",
                             code="previous_response_not_found")
        if chain[0].previous_id is not None:
            raise BadRequest(f"an earlier response of this conversation ({chain[0].previous_id!r}) is no longer "
                             "stored; start again with the whole input", param="previous_response_id",
                             code="previous_response_not_found")
        items: list[dict[str, Any]] = []
        for record in chain:
            items.extend(record.input_items)
            items.extend(record.response.get("output") or [])
        return items

    async def close(self) -> None:
        try:
            await self._call(self._close)
        finally:
            self._worker.shutdown(wait=True)


def _record(row: tuple[str, str | None, str, str]) -> StoredResponse:
    return StoredResponse(id=row[0], previous_id=row[1], input_items=json.loads(row[2]), response=json.loads(row[3]))
