"""The two databases the registry runs on, behind one small interface: SQLite and PostgreSQL.

A backend opens connections, runs a write transaction (``transaction``: a ``Transaction``
with ``execute``, ``executemany``, ``fetchall`` and ``insert_rows``) and answers reads
(``query``: rows as dicts). SQL is written once, with ``?`` placeholders and the syntax
both engines share (``ON CONFLICT … DO UPDATE``, ``LIMIT … OFFSET``); the PostgreSQL side
turns ``?`` into ``%s``. ``insert_rows`` is the batch path: one ``executemany`` on SQLite,
one ``COPY`` on PostgreSQL. ``shared`` says whether other controllers may write the same
database (PostgreSQL), which the registry uses to pick up their telemetry.

- SQLite (WAL): one writer connection under a lock, one reader connection per thread.
- PostgreSQL (psycopg 3): a connection pool (``psycopg_pool``) for writers and readers;
  imported only when a ``postgresql://`` URL is configured, so SQLite needs no extra package.

Every call here blocks on I/O: run them from worker threads, never on an event loop.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError
from agent.fleet.registry._schema import MIGRATIONS, VERSION_TABLE, statements

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Any constant works: it names the lock two controllers starting at once migrate under.
MIGRATION_LOCK_KEY = 0x6564676546
CONNECT_TIMEOUT_S = 10.0


class Transaction(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None: ...
    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...
    def insert_rows(
        self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]
    ) -> None: ...


class Backend(Protocol):
    dialect: str
    shared: bool
    location: str

    def transaction(self) -> Any: ...  # a context manager yielding a Transaction
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


class _SQLiteTransaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def insert_rows(self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
        self._conn.executemany(_insert_sql(table, columns), rows)


class SQLiteBackend:
    dialect = "sqlite"
    shared = False

    def __init__(self, path: str | Path) -> None:
        self.location = str(path)
        self._memory = self.location == ":memory:"
        if not self._memory:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer = self._connect()
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.location, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across a controller crash in WAL mode; only a power cut can lose
        # the last batch, which the devices resend anyway (retained status/meta, telemetry).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def transaction(self) -> Iterator[_SQLiteTransaction]:
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteTransaction(self._writer)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self._memory:  # another connection to ":memory:" would be another, empty database
            with self._lock:
                return [dict(row) for row in self._writer.execute(sql, params).fetchall()]
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return [dict(row) for row in conn.execute(sql, params).fetchall()]

    def lock_schema(self, tx: Transaction) -> None:
        """BEGIN IMMEDIATE already holds the database's write lock."""

    def close(self) -> None:
        with self._lock:
            self._writer.close()


def _pg(sql: str) -> str:
    # The registry's SQL has no literal "?" or "%": a plain replace is exact.
    return sql.replace("?", "%s")


class _PostgresTransaction:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(_pg(sql), params)
        return self._cursor.rowcount

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self._cursor.executemany(_pg(sql), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        self._cursor.execute(_pg(sql), params)
        return [tuple(row.values()) for row in self._cursor.fetchall()]

    def insert_rows(self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
        with self._cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


class PostgresBackend:
    dialect = "postgresql"
    shared = True

    def __init__(self, url: str, *, pool_size: int = 8, password: str | None = None) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:
            raise ConfigError(
                "registry.url: PostgreSQL needs psycopg 3; pip install 'edge-agent[postgres]'",
                key="registry.url",
            ) from exc
        self._psycopg = psycopg
        # Where it is, for logs: the URL without any password in it.
        info = psycopg.conninfo.conninfo_to_dict(url)
        info.pop("password", None)
        self.location = psycopg.conninfo.make_conninfo(**info)
        kwargs: dict[str, Any] = {"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S}
        if password is not None:
            kwargs["password"] = password
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=kwargs, open=False, name="edge-registry"
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise ConfigError(
                f"registry.url: cannot connect to PostgreSQL within {CONNECT_TIMEOUT_S:g} s "
                "(is it running, and are the host, database, user and password right?)",
                key="registry.url",
            ) from exc

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield _PostgresTransaction(cursor)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._pool.connection() as conn:
            return conn.execute(_pg(sql), params).fetchall()

    def lock_schema(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    def close(self) -> None:
        self._pool.close()


def open_backend(
    location: str | Path, *, pool_size: int = 8, password: str | None = None
) -> SQLiteBackend | PostgresBackend:
    """PostgreSQL for a ``postgresql://`` URL, else SQLite at that path; schema migrated."""
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES):
        backend: SQLiteBackend | PostgresBackend = PostgresBackend(
            text, pool_size=pool_size, password=password
        )
    elif "://" in text:
        raise ConfigError(
            "registry.url: only postgresql:// URLs are known (unset: SQLite at db_path)",
            key="registry.url",
        )
    else:
        backend = SQLiteBackend(text)
    try:
        migrate(backend)
    except BaseException:
        backend.close()
        raise
    return backend


def migrate(backend: SQLiteBackend | PostgresBackend) -> int:
    """Apply the migrations this database lacks, in order, in one transaction; the version."""
    newest = MIGRATIONS[-1].version
    with backend.transaction() as tx:
        backend.lock_schema(tx)
        tx.execute(VERSION_TABLE)
        applied = {row[0] for row in tx.fetchall("SELECT version FROM schema_version")}
        if applied and max(applied) > newest:
            raise ConfigError(
                f"registry: the database is at schema {max(applied)}, newer than this "
                f"controller knows ({newest}); upgrade this controller",
                key="registry.url",
            )
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in statements(migration, backend.dialect):
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_version (version, name, applied_ts) VALUES (?,?,?)",
                (migration.version, migration.name, time.time()),
            )
    return newest
