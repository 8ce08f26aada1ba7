"""A throw-away PostgreSQL cluster for tests and benchmarks: ``initdb`` in a temporary folder, the server
on a free loopback port, everything removed on :meth:`TempCluster.stop`.

>>> with TempCluster() as cluster:                      # needs PostgreSQL's server binaries (initdb)
...     url = cluster.create_database("prefs")          # postgresql://steer@127.0.0.1:PORT/prefs

PostgreSQL refuses to run as root: as root the commands run as ``nobody`` (``su -s /bin/bash nobody``),
which then owns the folder. :func:`find_bindir` looks in ``$STEERABLE_PG_BINDIR``, Debian's
``/usr/lib/postgresql/*/bin``, ``pg_config --bindir`` and the ``PATH``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from steerable.errors import SteerableError

USER = "steer"


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest installed version), or None."""
    candidates = [os.environ.get("STEERABLE_PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb") or "").parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _version(folder: str) -> tuple[int, ...]:
    digits = Path(folder).parent.name
    return tuple(int(p) for p in digits.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempCluster:
    """One PostgreSQL server in a temporary folder on 127.0.0.1 (see the module docstring).

    ``durable=False`` turns fsync off (fast set-up for tests; a crash of the machine could lose data)."""

    def __init__(self, bindir: Path | None = None, durable: bool = False) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise SteerableError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.bindir = found
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="steerable-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.as_nobody = os.geteuid() == 0
        if self.as_nobody:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        os.chmod(self.root, 0o700)

    # ---- commands ------------------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_nobody:
            command = ["su", "-s", "/bin/bash", "nobody", "-c", shlex.join(command)]
        out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root)
        if check and out.returncode != 0:
            last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise SteerableError(f"{args[0]} failed: {last[0]}")
        return out

    def start(self, timeout: int = 60) -> str:
        """initdb (first time) and start the server; returns the URL of its ``postgres`` database."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync")
        if not self.port:
            self.port = free_port()
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root}"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", str(timeout), "start")
        return self.url("postgres")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: like a crash)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        """Stop the server and delete the folder."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> TempCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
