"""A persistent judge cache: one sqlite file, keyed by (prompt, answer, judge id).

Every :meth:`JudgeCache.put` commits, so results survive a crash or a restart, and a
rerun of an evaluation asks the judge only about answers it has not seen. One cache
may be shared by threads (a lock serialises access) and by processes (sqlite's own
locking, WAL journal). Only real answers of the judge are stored, unparsed ones
included; a request that failed never reaches the cache.

Example:
    >>> import tempfile
    >>> from piggyback_interp.measures.judges.scoring import JudgeScore
    >>> with tempfile.TemporaryDirectory() as tmp, JudgeCache(f"{tmp}/judge.sqlite") as cache:
    ...     cache.put("Rate: ...", "Paris.", "local:tiny", JudgeScore(90.0, "score", 0.8, "90"))
    ...     cache.get("Rate: ...", "Paris.", "local:tiny").score, len(cache)
    (90.0, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from piggyback_interp.measures.judges.scoring import JudgeScore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(prompt: str, answer: str, judge: str) -> str:
    """The sha256 that identifies (prompt, answer, judge) in the cache."""
    return hashlib.sha256(json.dumps([prompt, answer, judge]).encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge results in a sqlite file (parent directories are created).

    ``prompt`` is the judge prompt exactly as sent (rendered), ``answer`` the answer
    being judged, ``judge`` the judge's :attr:`judge_id`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ValueError(f"judge cache path {self.path} is a directory; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"{self.path} is not a usable judge cache ({err}); delete it or choose another path"
            ) from err

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"

    def get(self, prompt: str, answer: str, judge: str) -> JudgeScore | None:
        """The stored result, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM judgements WHERE key = ?", (cache_key(prompt, answer, judge),)
            ).fetchone()
        return None if row is None else JudgeScore.from_dict(json.loads(row[0]))

    def put(self, prompt: str, answer: str, judge: str, score: JudgeScore) -> None:
        """Store (or replace) a result and commit."""
        row = (
            cache_key(prompt, answer, judge),
            judge,
            prompt,
            answer,
            json.dumps(score.to_dict()),
            time.time(),
        )
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)", row)
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_cache(cache: JudgeCache | str | os.PathLike[str] | None) -> JudgeCache | None:
    """A :class:`JudgeCache` from a cache, a path, or None."""
    if cache is None or isinstance(cache, JudgeCache):
        return cache
    return JudgeCache(cache)
