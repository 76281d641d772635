"""A real, throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary folder, `postgres`
on a free port of 127.0.0.1 (password auth over TCP, no other listeners), stopped by its PID and removed
afterwards.

    with postgres_server() as url:            # postgresql+psycopg://postgres:<pw>@127.0.0.1:<port>/postgres
        db = create_database(url, "t1")       # a fresh database on the same server, as a URL

The tests get it through tests/conftest.py's fixtures pg_server (session: the superuser URL) and pg_url
(a fresh, empty database per test); bench/bench_claims.py starts its own.

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/*/bin), which .ci/run installs.
When the tests run as root, initdb and postgres run as the `postgres` OS user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SUPERUSER = "postgres"


class PgServerError(RuntimeError):
    """The test server could not be set up (missing binaries, initdb or start failed)."""


def find_bin() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres (or both on PATH)."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        d = Path(initdb).parent
        version = d.parent.name
        if (d / "postgres").exists():
            found.append((tuple(int(x) for x in re.findall(r"\d+", version)), d))
    if found:
        return max(found)[1]
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).parent == Path(postgres).parent:
        return Path(initdb).parent
    raise PgServerError(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH); "
        ".ci/run installs them (apt-get install postgresql), or run: apt-get install -y postgresql"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> dict:
    """subprocess kwargs that drop root to the postgres OS user (empty when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PgServerError(
            "tests run as root but there is no `postgres` OS user to run the server as; "
            ".ci/run creates it by installing Debian's postgresql package"
        ) from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _chown(path: Path, as_kw: dict) -> None:
    if as_kw:
        os.chown(path, as_kw["user"], as_kw["group"])


def _temp_base(as_kw: dict) -> Path:
    """A temporary folder the server's user can reach (pytest's root-only tmp paths it cannot)."""
    parent = Path(tempfile.gettempdir())
    if as_kw and not all(os.stat(p).st_mode & 0o001 for p in [parent, *parent.parents]):
        parent = Path("/tmp")
    base = Path(tempfile.mkdtemp(prefix="pgtest-", dir=parent))
    os.chmod(base, 0o700)
    _chown(base, as_kw)
    return base


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _connect_ok(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(_libpq(url), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown by PID (SIGINT: clients are disconnected; SIGTERM would be PostgreSQL's "smart" mode,
    which waits for every pooled client connection to close), then SIGKILL on timeout."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass


@contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """Run a fresh PostgreSQL server; yields its superuser URL (postgresql+psycopg://, database postgres).
    Password (scram-sha-256) auth on 127.0.0.1 only; the password is random unless given."""
    bindir = find_bin()
    as_kw = _run_as()
    password = password or secrets.token_hex(12)
    base = _temp_base(as_kw)
    proc: subprocess.Popen | None = None
    try:
        data, pwfile, log = base / "data", base / "pwfile", base / "server.log"
        pwfile.write_text(password + "\n")
        _chown(pwfile, as_kw)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **as_kw,
        )
        if init.returncode != 0:
            msg = (init.stderr or init.stdout).strip().splitlines()
            raise PgServerError(f"initdb failed: {msg[-1] if msg else init.returncode}")
        for attempt in range(3):
            port = free_port()
            with open(log, "ab") as logf:
                proc = subprocess.Popen(
                    [
                        str(bindir / "postgres"),
                        "-D",
                        str(data),
                        "-p",
                        str(port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={base}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "shared_buffers=16MB",
                        "-c",
                        "max_connections=150",  # two per studies.run process: bench_claims runs 32 at once
                    ],
                    cwd=base,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the server
                    **as_kw,
                )
            url = f"postgresql+psycopg://{SUPERUSER}:{password}@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if _connect_ok(url):
                    break
                time.sleep(0.1)
            else:
                tail = _tail(log)
                _stop(proc)
                if "could not bind" in tail and attempt < 2:  # the free port was taken meanwhile
                    continue
                raise PgServerError(f"postgres did not start within {START_TIMEOUT_S:.0f} s; log:\n{tail}")
            break
        yield url
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """CREATE DATABASE name on url's server; returns url with that database."""
    import psycopg
    import sqlalchemy as sa

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)
