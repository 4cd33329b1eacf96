"""Every routed question's trace in one embedded SQLite file: what the monitor reads.

Why SQLite: it is in the standard library, one file, and in WAL mode readers (the Monitor page,
`python -m cascade_core monitor DB`) never block the server's writers. Each trace is one INSERT
in autocommit mode, done in the worker thread BEFORE the client gets its answer: a `kill -9` of
the server loses at most the request in flight (WAL with synchronous=NORMAL survives a process
crash; only an OS crash or power loss can lose the last commits). Each thread has its own
connection and a 30 s busy timeout, so concurrent writers wait for the lock instead of failing.

What is stored (one row per question): the model served, the policy's hash, the stage path with
each visited stage's signals, decision, cost and answer KEY (a hash of what the grader compares,
`graders`: equal keys = equivalent answers), the latency, the audit's outcome (`audit`) and the
fallback note when the safer policy ran. The question and answer texts only with
`store_questions=True`, and even then with anything shaped like a credential masked (`redact`);
request headers and tokens are never seen here.

Retention: rows older than `retention_days` and beyond the newest `max_rows` are deleted at open
and every `PRUNE_EVERY` inserts.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

SCHEMA_VERSION = 1
PRUNE_EVERY = 256
AUDIT_STATES = ("no", "pending", "done", "free", "skipped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    question_hash TEXT NOT NULL,
    question TEXT,
    answer TEXT,
    path TEXT NOT NULL,
    steps TEXT NOT NULL,
    answered_by TEXT,
    kept_early INTEGER NOT NULL,
    answer_key TEXT,
    flops REAL NOT NULL,
    dollars REAL NOT NULL,
    tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    status TEXT NOT NULL,
    fallback TEXT,
    sampled INTEGER NOT NULL,
    audit TEXT NOT NULL,
    loss INTEGER,
    audit_steps TEXT,
    audit_flops REAL NOT NULL DEFAULT 0,
    audit_dollars REAL NOT NULL DEFAULT 0,
    audit_seconds REAL NOT NULL DEFAULT 0,
    reference_flops REAL,
    reference_dollars REAL
);
CREATE INDEX IF NOT EXISTS traces_policy ON traces(policy_hash, id);
CREATE INDEX IF NOT EXISTS traces_created ON traces(created);
CREATE TABLE IF NOT EXISTS policies (
    hash TEXT PRIMARY KEY, kind TEXT NOT NULL, description TEXT NOT NULL, info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, policy_hash TEXT NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, numbers TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fallback (policy_hash TEXT PRIMARY KEY, since REAL NOT NULL, reason TEXT NOT NULL);
"""

TRACE_COLUMNS = ("created", "model", "policy_hash", "kind", "question_hash", "question", "answer", "path", "steps",
                 "answered_by", "kept_early", "answer_key", "flops", "dollars", "tokens", "latency_s", "status",
                 "fallback", "sampled", "audit", "loss", "audit_steps", "audit_flops", "audit_dollars",
                 "audit_seconds", "reference_flops", "reference_dollars")
AUDIT_COLUMNS = ("audit", "loss", "audit_steps", "audit_flops", "audit_dollars", "audit_seconds", "reference_flops",
                 "reference_dollars")

# Shapes of credentials that must never land in the file even when texts are stored.
_SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|(?i:bearer)\s+[A-Za-z0-9._\-~+/=]{8,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:(?:api[_-]?key|password|secret|token)\s*[:=]\s*)\S+)")


def redact(text: str | None) -> str | None:
    """`text` with anything shaped like a credential (API keys, bearer tokens, private keys,
    `password=...`) replaced by `[redacted]`."""
    return None if text is None else _SECRETS.sub("[redacted]", str(text))


def text_hash(text: str) -> str:
    """A short, stable hash (sha256, 16 hex digits) of a text: questions and answer keys."""
    return hashlib.sha256(str(text).encode("utf-8", errors="replace")).hexdigest()[:16]


class TraceStoreError(RuntimeError):
    """The database cannot be used (not a trace store, a newer schema, unreadable)."""


class TraceStore:
    """One SQLite trace database (module docstring). Safe to share between threads."""

    def __init__(self, path: Path | str, *, retention_days: float | None = None, max_rows: int | None = None,
                 store_questions: bool = False, read_only: bool = False):
        if retention_days is not None and not retention_days > 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.path = Path(path)
        self.retention_days, self.max_rows = retention_days, max_rows
        self.store_questions, self.read_only = bool(store_questions), bool(read_only)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._inserts = 0
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no trace database at {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._conn()
            if not read_only:
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            raise TraceStoreError(f"{self.path}: not a trace database ({err})") from None
        if row is None or int(row[0]) > SCHEMA_VERSION:
            raise TraceStoreError(f"{self.path}: trace schema {row[0] if row else 'missing'}, this code reads "
                                  f"version {SCHEMA_VERSION}")
        if not read_only:
            self.prune()

    # -- connections ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.read_only:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def add(self, row: dict) -> int:
        """Insert one trace row (keys: `TRACE_COLUMNS`; missing ones NULL / defaults); its id.
        Committed when this returns. Texts are dropped unless `store_questions`, else redacted."""
        unknown = set(row) - set(TRACE_COLUMNS)
        if unknown:
            raise ValueError(f"unknown trace column(s): {', '.join(sorted(unknown))}")
        values = dict(row)
        values.setdefault("created", time.time())
        for key in ("question", "answer"):
            values[key] = redact(values.get(key)) if self.store_questions else None
        for key in ("steps", "audit_steps"):
            if values.get(key) is not None and not isinstance(values[key], str):
                values[key] = json.dumps(_scrub_steps(values[key], self.store_questions), allow_nan=False)
        values.setdefault("audit", "no")
        values.setdefault("sampled", 0)
        if values["audit"] not in AUDIT_STATES:
            raise ValueError(f"audit must be one of {', '.join(AUDIT_STATES)}, got {values['audit']!r}")
        for key in ("audit_flops", "audit_dollars", "audit_seconds"):
            values.setdefault(key, 0.0)
        cols = [c for c in TRACE_COLUMNS if c in values]
        sql = f"INSERT INTO traces ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        cur = self._conn().execute(sql, [values[c] for c in cols])
        with self._lock:
            self._inserts += 1
            due = self._inserts % PRUNE_EVERY == 0
        if due:
            self.prune()
        return int(cur.lastrowid)

    def update_audit(self, trace_id: int, **fields) -> None:
        """Write an audit's outcome into its trace row (keys: `AUDIT_COLUMNS`)."""
        unknown = set(fields) - set(AUDIT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown audit column(s): {', '.join(sorted(unknown))}")
        if "audit" in fields and fields["audit"] not in AUDIT_STATES:
            raise ValueError(f"audit must be one of {', '.join(AUDIT_STATES)}, got {fields['audit']!r}")
        if fields.get("audit_steps") is not None and not isinstance(fields["audit_steps"], str):
            fields["audit_steps"] = json.dumps(_scrub_steps(fields["audit_steps"], self.store_questions),
                                               allow_nan=False)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._conn().execute(f"UPDATE traces SET {sets} WHERE id = ?", [*fields.values(), int(trace_id)])

    def register_policy(self, policy_hash: str, kind: str, description: str, info: dict) -> None:
        """What the monitor knows about a running policy (stages, target, delta, drift expectation)."""
        self._conn().execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?, ?)",
                             (policy_hash, kind, description, json.dumps(info, allow_nan=False), time.time()))

    def add_alarm(self, policy_hash: str, kind: str, message: str, numbers: dict | None = None) -> int:
        cur = self._conn().execute("INSERT INTO alarms (created, policy_hash, kind, message, numbers) VALUES "
                                   "(?, ?, ?, ?, ?)", (time.time(), policy_hash, kind, message,
                                                       json.dumps(numbers or {}, allow_nan=False)))
        return int(cur.lastrowid)

    def set_fallback(self, policy_hash: str, reason: str) -> None:
        self._conn().execute("INSERT OR IGNORE INTO fallback VALUES (?, ?, ?)", (policy_hash, time.time(), reason))

    def prune(self) -> int:
        """Apply the retention (module docstring); how many trace rows were deleted."""
        if self.read_only or (self.retention_days is None and self.max_rows is None):
            return 0
        conn, deleted = self._conn(), 0
        if self.retention_days is not None:
            cutoff = time.time() - self.retention_days * 86400.0
            deleted += conn.execute("DELETE FROM traces WHERE created < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM alarms WHERE created < ?", (cutoff,))
        if self.max_rows is not None:
            deleted += conn.execute("DELETE FROM traces WHERE id <= (SELECT id FROM traces ORDER BY id DESC "
                                    "LIMIT 1 OFFSET ?)", (int(self.max_rows),)).rowcount
        return deleted

    # -- reading -------------------------------------------------------------------------------
    def count(self, policy_hash: str | None = None) -> int:
        if policy_hash is None:
            return int(self._conn().execute("SELECT COUNT(*) FROM traces").fetchone()[0])
        return int(self._conn().execute("SELECT COUNT(*) FROM traces WHERE policy_hash = ?",
                                        (policy_hash,)).fetchone()[0])

    def rows(self, policy_hash: str | None = None, since_id: int = 0, columns: Iterable[str] | None = None,
             limit: int | None = None) -> list[dict]:
        """Trace rows in id order (all columns, `steps`/`audit_steps` decoded)."""
        cols = ["id", *(columns or TRACE_COLUMNS)]
        bad = set(cols) - {"id", *TRACE_COLUMNS}
        if bad:
            raise ValueError(f"unknown trace column(s): {', '.join(sorted(bad))}")
        sql = f"SELECT {', '.join(cols)} FROM traces WHERE id > ?"
        args: list = [int(since_id)]
        if policy_hash is not None:
            sql += " AND policy_hash = ?"
            args.append(policy_hash)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out = []
        for r in self._conn().execute(sql, args):
            row = dict(r)
            for key in ("steps", "audit_steps"):
                if row.get(key):
                    row[key] = json.loads(row[key])
            out.append(row)
        return out

    def policies(self) -> list[dict]:
        """Every policy seen, newest first, with its info decoded."""
        out = []
        for r in self._conn().execute("SELECT hash, kind, description, info, created FROM policies ORDER BY created "
                                      "DESC"):
            out.append({"hash": r["hash"], "kind": r["kind"], "description": r["description"],
                        "info": json.loads(r["info"]), "created": r["created"]})
        return out

    def alarms(self, policy_hash: str | None = None, limit: int = 100) -> list[dict]:
        """The latest alarms, newest first."""
        sql, args = "SELECT * FROM alarms", []
        if policy_hash is not None:
            sql, args = sql + " WHERE policy_hash = ?", [policy_hash]
        sql += f" ORDER BY id DESC LIMIT {int(limit)}"
        return [{**dict(r), "numbers": json.loads(r["numbers"])} for r in self._conn().execute(sql, args)]

    def fallback(self, policy_hash: str) -> dict | None:
        r = self._conn().execute("SELECT since, reason FROM fallback WHERE policy_hash = ?", (policy_hash,)).fetchone()
        return None if r is None else {"since": r["since"], "reason": r["reason"]}

    def integrity(self) -> str:
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])


def _scrub_steps(steps, store_texts: bool) -> list:
    """Steps as stored: the answer text only with `store_texts` (redacted), never otherwise."""
    out = []
    for step in steps:
        step = dict(step)
        if "answer" in step:
            step["answer"] = redact(step["answer"]) if store_texts else None
        out.append(step)
    return out
