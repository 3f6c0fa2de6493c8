"""The processes of ``benchmarks.load``: ``broker serve`` on a free port, a throwaway
PostgreSQL cluster, and the CPU that each of them (and the whole machine) used.

CPU is read from ``/proc``: a process tree's user and system time, its reaped
children's included, and the machine's busy time over all cores, so a
measurement can say how many cores the server, PostgreSQL and everything else
kept busy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with its durable defaults."""

    def __init__(self) -> None:
        # Its own directory under /tmp: the server's user must reach it.
        self.workdir = Path(tempfile.mkdtemp(prefix="broker-load-pg-"))
        self.data = self.workdir / "pg"
        self.port = _free_port()
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
        if not found:
            raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = found[0].parent
        # initdb refuses to run as root.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        self.databases = 0

    def _run(self, tool: str, *args: str) -> None:
        command = [*self.as_user, str(self.bin / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True)  # noqa: S603 - PostgreSQL's tools
        if done.returncode:
            raise RuntimeError(f"{tool} failed: {done.stderr or done.stdout}")

    def start(self) -> None:
        self.workdir.chmod(0o755)
        if self.as_user:
            shutil.chown(self.workdir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.workdir} "
            "-c max_connections=300 -c shared_buffers=256MB"
        )
        log = str(self.workdir / "pg.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def fresh_database(self) -> str:
        self.databases += 1
        name = f"broker_{self.databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from the state on


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root``, its live descendants and the children it has reaped."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    ticks = 0
    for pid in tree:
        if fields := _stat(pid):
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _TICK


def _machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (all cores), and those the hypervisor
    took for other guests while this one had work (steal: on a shared virtual
    machine, time its processes waited without running)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    steal = values[7]
    return (sum(values[:7]) - idle) / _TICK, steal / _TICK


class CpuMeter:
    """CPU used, in cores, by the server, PostgreSQL and the rest of the machine."""

    def __init__(
        self, server: int | None, postgres: int | None, others: dict[str, int] | None = None
    ) -> None:
        """Process trees by name: ``server``, ``postgres`` when given, and ``others``
        (``benchmarks.replicas``: each replica and the proxy)."""
        self.roots = {
            **({"server": server} if server else {}),
            **({"postgres": postgres} if postgres else {}),
            **(others or {}),
        }

    def __enter__(self) -> CpuMeter:
        self.start = time.monotonic()
        self.before = {name: _tree_cpu(pid) for name, pid in self.roots.items()}
        self.busy_before = _machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.start
        used = {n: _tree_cpu(pid) - self.before[n] for n, pid in self.roots.items()}
        (busy_now, steal_now), (busy_before, steal_before) = _machine_busy(), self.busy_before
        busy, steal = busy_now - busy_before, steal_now - steal_before
        self.cores = {n: v / wall for n, v in used.items()}
        self.cores["machine"] = busy / wall
        self.cores["stolen"] = steal / wall


class Server:
    """``broker serve`` in a process of its own, on a free port."""

    def __init__(
        self, url: str, data_dir: Path, workers: int, env: dict[str, str], access_log: bool = False
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BROKER_DATABASE_URL": url,
            "BROKER_DATA_DIR": str(data_dir),
            # The benchmark's market is bids for capacity alone: nothing runs on them.
            "BROKER_ALLOW_CAPACITY_BIDS": "1",
            **env,
        }
        self.workers = workers
        self.access_log = access_log
        self.log = data_dir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        command = [sys.executable, "-m", "broker.cli", "serve", "--no-migrate"]
        command += ["--port", str(self.port), "--workers", str(self.workers)]
        command += ["--access-log" if self.access_log else "--no-access-log"]
        with self.log.open("wb") as log:
            # Our own interpreter and command.
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)  # noqa: S603
        try:
            self._wait_ready()
        except BaseException:  # Ctrl-C too: a server that never came up is stopped
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=self.base, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"broker serve exited; see {self.log}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        return
                time.sleep(0.2)
        raise RuntimeError(f"broker serve did not come up in 60 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
