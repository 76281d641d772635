"""The database underneath the store: URLs (one driver for PostgreSQL), engines (SQLite in WAL with a
busy timeout), lock retries, reachability checks with one-line errors, and the process facts a claim
or trial row records (code version, live pids). studies.store builds the harness's API on it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from core.errors import HarnessError

DEFAULT_URL = "sqlite:///runs/studies.db"  # the results store when study.yaml and --storage name none
BUSY_TIMEOUT_S = 60.0

T = TypeVar("T")


class StoreError(HarnessError):
    """The store cannot be opened or read (missing file, empty store, unknown study, unreachable or
    refusing server, malformed URL); one line, never the password."""


# What a retry can cure: SQLite's lock (last resort beside the busy timeout), and a PostgreSQL server
# refusing a new connection at its max_connections while other processes hold theirs. The refusal comes
# at connect time, before any statement ran, so retrying cannot apply anything twice (bench_claims: 1 of
# 1,000 trials failed on it with 32 processes against a 150-connection server before this was retried).
_TRANSIENT = (
    "database is locked",
    "database is busy",
    "database table is locked",
    "too many clients already",
    "remaining connection slots are reserved",
    "too many connections",
)


def is_transient_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(t in msg for t in _TRANSIENT)


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 10, **kwargs: Any) -> T:
    """Call fn, retrying with jittered exponential backoff (up to about 30 s in all) while the store reports
    a lock or refuses a connection for now (is_transient_error)."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # OperationalError, or optuna's StorageInternalError wrapping it
            locked = is_transient_error(exc) or (
                exc.__cause__ is not None and is_transient_error(exc.__cause__)
            )
            if not locked or i == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def retrying(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return retry_locked(method, *args, **kwargs)

    return wrapper


PG_DRIVER = "psycopg"  # psycopg 3, a dependency; to SQLAlchemy a plain postgresql:// means psycopg2
CONNECT_TIMEOUT_S = 10  # check_reachable's wait for a server; the engines wait CONNECT_TIMEOUT_S * 3


def normalize_url(url: str) -> str:
    """url with a plain PostgreSQL scheme (postgresql://, postgres://) mapped to psycopg 3
    (postgresql+psycopg://); postgres+DRIVER:// becomes postgresql+DRIVER://. Every other URL, and one
    naming its driver (postgresql+psycopg2://), is returned as is. Nothing is parsed or checked here."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    dialect, _, driver = scheme.partition("+")
    if dialect.lower() not in ("postgresql", "postgres"):
        return url
    return f"postgresql+{driver or PG_DRIVER}://{rest}"


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"


def engine_kwargs(url: str) -> dict[str, Any]:
    """create_engine kwargs shared by the harness engine and Optuna's RDBStorage."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    # A server's max_connections is shared by every process on every host: keep one idle connection per
    # engine (two per studies.run process), and open up to 4 more only while threads (trial and claim
    # heartbeats) overlap. SQLAlchemy's default (5 idle + 10) let 32 processes exhaust a 150-connection
    # server (bench_claims: trials failed on "too many clients").
    pool = {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 4, "pool_timeout": 60}
    if sa.engine.make_url(normalize_url(url)).get_backend_name() == "postgresql":
        return {**pool, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S * 3}}
    return pool


def sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def make_engine(url: str, create: bool = True) -> sa.Engine:
    """An engine for url (normalize_url'd); for SQLite: parent folder created (when create), WAL on,
    busy timeout on every connection."""
    url = normalize_url(url)
    if is_sqlite(url) and create:
        db = sa.engine.make_url(url).database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **engine_kwargs(url))
    if is_sqlite(url):
        event.listen(engine, "connect", sqlite_on_connect)
    return engine


_KINDS = {"postgresql": ("PostgreSQL", 5432), "mysql": ("MySQL", 3306), "mariadb": ("MariaDB", 3306)}
_AUTH_WORDS = ("authentication failed", "no password supplied", "does not exist", "pg_hba.conf", "permission")


def redact_url(url: str) -> str:
    """url with its password shown as *** (for messages); works on malformed URLs too."""
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def check_reachable(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open url's database once, or raise StoreError in one line (never the password): a malformed URL,
    an unknown database kind or missing driver, a server that cannot be reached (naming host and port),
    one that rejects the user or has no such database (naming host, port, user and database), or for
    SQLite a folder that cannot be created or written. Creates nothing but the SQLite folder."""
    shown = redact_url(url)
    try:
        u = sa.engine.make_url(normalize_url(url))
        _ = u.port  # a non-numeric port fails here, not in the driver
    except (sa.exc.ArgumentError, ValueError):
        raise StoreError(
            f"malformed store URL {shown!r} "
            "(expected e.g. sqlite:///runs/studies.db or postgresql://user:password@host:5432/database)"
        ) from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        return _check_sqlite_folder(u.database)
    kind, default_port = _KINDS.get(backend, (backend, None))
    host = u.host or u.query.get("host") or "localhost"
    where = f"{host if isinstance(host, str) else host[0]}:{u.port or default_port or '?'}"
    connect_args = {"connect_timeout": max(1, round(timeout_s))} if backend == "postgresql" else {}
    try:
        engine = sa.create_engine(u, poolclass=sa.pool.NullPool, connect_args=connect_args)
    except sa.exc.NoSuchModuleError:
        raise StoreError(f"unknown database kind {u.drivername!r} in store URL {shown!r}") from None
    except ImportError as e:
        hint = "; plain postgresql:// URLs use psycopg 3, which comes with the harness"
        raise StoreError(
            f"the driver for {u.drivername} URLs is not installed (no module {e.name or e})"
            + (hint if backend == "postgresql" else "")
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as e:
        raise StoreError(_connect_error(kind, where, u, e.orig, timeout_s)) from None
    finally:
        engine.dispose()


def _connect_error(kind: str, where: str, u: sa.URL, orig: BaseException, timeout_s: float) -> str:
    import getpass
    import re

    msg = " ".join(str(orig).split())
    low = msg.lower()
    fatal = re.search(r"\b(?:FATAL|ERROR):\s*(.*)", msg)
    if "too many clients" in low or "too many connections" in low:
        return (
            f"{kind} at {where} refuses more connections (too many clients: each studies.run process "
            "holds two; raise max_connections)"
        )
    if fatal or any(w in low for w in _AUTH_WORDS):  # the server answered and said no
        detail = fatal.group(1) if fatal else re.sub(r"^.*? failed: ", "", msg)
        detail = re.sub(r' for user "[^"]*"$', "", detail.rstrip(". "))
        user = u.username or getpass.getuser()
        db = u.database or user
        if re.search(r'database "[^"]*" does not exist', detail):
            return f"{kind} at {where} has no database {db!r} (user {user!r}; create the database first)"
        return f"{kind} at {where} rejected user {user!r} for database {db!r} ({detail})"
    if "connection refused" in low:
        reason = "connection refused"
    elif "timeout" in low or "timed out" in low:
        reason = f"no answer within {timeout_s:g} s"
    elif "resolve host" in low or "translate host name" in low or "name or service not known" in low:
        reason = "unknown host name"
    else:
        reason = re.sub(r"^connection failed: ", "", msg).split(" Is the server running")[0]
    return f"cannot reach {kind} at {where} ({reason})"


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def _check_sqlite_folder(database: str | None) -> None:
    import tempfile

    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise StoreError(f"cannot create the folder {path.parent} for the SQLite store ({why})") from None
    if path.is_dir():
        raise StoreError(f"the SQLite store {path} is a folder, not a database file")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as e:
        raise StoreError(f"cannot write the SQLite store {path} ({e.strerror or e})") from None
    # A file that is not a database would otherwise fail deep inside SQLAlchemy ("file is not a database",
    # a 128-line traceback) after the data set check; an empty file is a new database to SQLite.
    with open(path, "rb") if path.is_file() else contextlib.nullcontext(None) as f:
        head = f.read(len(SQLITE_HEADER)) if f is not None else SQLITE_HEADER
    if head and head != SQLITE_HEADER:
        raise StoreError(f"{path} is not an SQLite database (its first bytes are not SQLite's header)")


@functools.cache
def code_version(root: str | None = None) -> str:
    """`git rev-parse HEAD` (+"+dirty" when the tree has changes), or "unknown"."""
    cwd = root or str(Path(__file__).resolve().parents[1])
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        # --no-optional-locks: never take index.lock (a study must not disturb someone committing)
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        dirty = status.returncode == 0 and status.stdout.strip() != ""
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def created_concurrently(create: Callable[[], T], attempts: int = 5) -> T:
    """create() (tables, Optuna's schema), retried when another process created the same objects between
    its check and ours: 'already exists', or a unique violation on the catalog / alembic_version."""
    for i in range(attempts):
        try:
            return create()
        except Exception as exc:
            text = f"{exc} {exc.__cause__}"
            racing = ("already exists", "duplicate key", "UNIQUE constraint failed")
            if not any(r in text for r in racing) or i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1) * (1 + random.random()))
    raise AssertionError("unreachable")
