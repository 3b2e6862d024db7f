"""A real Milvus server for the test session: the standalone server of PyPI's ``milvus`` package, loopback only.

``make milvus-server`` installs it into ``.venv-milvus/`` (its client extra pins a pymilvus older than the
project's, so it keeps out of the project's environment) and unpacks its binaries once. This module is
both the test side (start the session's server once, find it, stop it) and, run as a script, the relay
process that owns the server.

Why a relay:

* The 2.3.5 server binds its gRPC ports on every interface and has no option to bind loopback only,
  so it runs in a private network namespace that holds nothing but its own loopback.
* The tests reach it over the host's loopback through one process that opens a listening socket on
  the host's 127.0.0.1 first, then moves itself into a new network namespace (sockets stay in the
  namespace they were made in), starts the server there and copies bytes between the two. The test
  processes stay where they are, so one test file, the whole suite and every pytest-xdist worker
  reach the same server at ``http://127.0.0.1:PORT`` however pytest was started. In the private
  namespace the server has its ports to itself: its default ports are always free, so it never
  slides to the next port without saying so.
* One server a session, for its start (4 s here with its binaries unpacked, 8-20 s without) and memory
  (170-330 MB): the first process that needs it
  starts the relay under a file lock in a folder the pytest controller names in the environment; the
  others read its address there. The controller stops it at the end, by the relay's PID, and the
  relay stops the server by itself when the controller is gone (killed), so none outlives a run.
* Authorization on, as on a deployment: clients present the default root user's token (:data:`ROOT_TOKEN`).
* A fresh data folder each start (a reused one failed to start), removed at the stop. The binaries
  unpacked at install time are linked into it, which spares ~5 s of decompressing at every start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-milvus"
SERVER = VENV / "bin" / "milvus-server"
UNPACKED = VENV / "unpacked"  # the package's own unpacking of its binaries: UNPACKED/bin
STATE_VARIABLE = "REIR_MILVUS_TEST_SERVER"  # the session's folder, named by the pytest controller
PROXY_PORT = 19530  # inside the private namespace, where nothing else listens
ROOT_TOKEN = "root:Milvus"  # the server requires credentials, as a deployment would: its default root user
START_TIMEOUT_S = 180
READY_BANNER = "Ctrl+C to exit"  # milvus-server prints its banner once its health check answers
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class ServerUnavailable(Exception):
    """This machine cannot run the server (not installed, no network namespaces): the tests skip, or fail in CI."""


# ---- the test side ---------------------------------------------------------------------------------------


def session_folder(create: bool = False) -> Path | None:
    """The folder shared by the pytest controller and its workers; made (by the controller) when ``create``."""
    named = os.environ.get(STATE_VARIABLE)
    if named or not create:
        return Path(named) if named else None
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="reir-milvus-"))
    (folder / "owner").write_text(str(os.getpid()))
    os.environ[STATE_VARIABLE] = str(folder)  # inherited by the xdist workers, started after this
    return folder


_relay: subprocess.Popen | None = None  # the relay, when this process started it (so it can be reaped)


def start(folder: Path) -> None:
    """Start the session's relay unless a process of this session already did; returns without waiting."""
    global _relay
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "relay.pid").exists():
            return
        if not SERVER.is_file():
            raise ServerUnavailable(f"no Milvus server at {SERVER.relative_to(REPO)}; install it with "
                                    "`make milvus-server` (milvus==2.3.5 in its own virtual environment)")
        command = [sys.executable, __file__, "--folder", str(folder),
                   "--owner", (folder / "owner").read_text().strip()]
        log = open(folder / "relay.log", "wb")  # noqa: SIM115 - handed to the relay, closed once it has started
        _relay = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # not stopped by a Ctrl+C meant for pytest
        log.close()
        (folder / "relay.pid").write_text(str(_relay.pid))


def address(folder: Path, timeout: float = START_TIMEOUT_S) -> str:
    """The server's URI once it answers, starting it if need be."""
    start(folder)
    state_file, deadline = folder / "state.json", time.monotonic() + timeout
    while not state_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Milvus server did not start in {timeout:.0f} s; see {folder / 'relay.log'}")
        time.sleep(0.2)
    state = json.loads(state_file.read_text())
    if "unavailable" in state:
        raise ServerUnavailable(state["unavailable"])
    if "error" in state:
        raise RuntimeError(state["error"])
    return state["uri"]


def stop(folder: Path, timeout: float = 60) -> None:
    """Stop the session's relay (it stops the server and removes its data), then remove the folder."""
    pid_file = folder / "relay.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if _relay is not None and _relay.pid == pid:
            _relay.wait(timeout)
        else:  # started by a worker since gone: not this process's child, so wait for the PID to go
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---- the relay (this file run as a script) ---------------------------------------------------------------


def private_network() -> None:
    """Move this process into a new network namespace with its loopback up and nothing else.

    As root a network namespace alone; otherwise inside a new user namespace too (``unshare -rn``), where
    this process keeps its own user id. Must run before this process starts a thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    user = os.getuid() != 0
    if libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if user else 0)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    if user:
        uid, gid = os.getuid(), os.getgid()
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # `ip link set lo up`
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def write_state(folder: Path, **state) -> None:
    partial = folder / "state.json.partial"
    partial.write_text(json.dumps(state))
    partial.replace(folder / "state.json")


class Server:
    """``milvus-server`` with a fresh data folder, in this process's (private) network namespace."""

    def __init__(self, data: Path):
        self.data = data
        data.mkdir()
        if (UNPACKED / "bin").is_dir():
            (data / "bin").symlink_to(UNPACKED / "bin", target_is_directory=True)
        self.log = data / "milvus-server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(SERVER), "--data", str(data), "--proxy-port", str(PROXY_PORT),
                                             "--authorization-enabled", "true"],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.milvus_pid: int | None = None

    def wait_ready(self, timeout: float, owner: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")
            found = re.search(r"Process:\s+(\d+)", text)
            if found:
                self.milvus_pid = int(found.group(1))
            if READY_BANNER in text:
                break
            if self.process.poll() is not None or time.monotonic() > deadline or not alive(owner):
                ended = "ended" if self.process.poll() is not None else f"not ready in {timeout:.0f} s"
                raise RuntimeError(f"milvus-server {ended}: {' '.join(text.split())[-300:]} (logs in "
                                   f"{self.data / 'logs'})")
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=5):
            pass  # the port asked for, not one it slid to

    def stop(self) -> None:
        """SIGINT (milvus-server stops its server, then exits), then whatever is left of its process group,
        the pid file the server leaves behind when it names this server, and the data folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while self.milvus_pid is not None and alive(self.milvus_pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # the server, stopped by milvus-server or killed with its group above
        for run_dir in ("/run/milvus", "/tmp/milvus"):  # the server's runtime folder, root's or a user's
            pid_file = Path(run_dir) / "standalone.pid"
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(self.milvus_pid):
                    pid_file.unlink()
        shutil.rmtree(self.data, ignore_errors=True)


async def relay(listener: socket.socket, owner: int, server: Server) -> None:
    """Copy bytes between connections on the host's loopback and the server's port, until told to stop,
    the pytest controller is gone or the server ended."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def connect(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", PROXY_PORT)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with await asyncio.start_server(connect, sock=listener):
        while not stopping.is_set() and alive(owner) and server.process.poll() is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="the session's folder: state.json, data")
    parser.add_argument("--owner", type=int, required=True, help="the pytest controller's PID")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S)
    args = parser.parse_args(argv)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # on the host's loopback: made before leaving its namespace
    listener.listen()
    try:
        private_network()
    except OSError as exc:
        listener.close()
        write_state(args.folder, unavailable=f"cannot make a private network namespace for the Milvus server "
                    f"({exc}); run the tests as root or where unprivileged user namespaces are allowed "
                    "(unshare -rn true)")
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop while starting: KeyboardInterrupt
    started, server = time.monotonic(), None
    try:
        try:
            server = Server(args.folder / "data")
            server.wait_ready(args.timeout, args.owner)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the waiting tests are told
            write_state(args.folder, error=f"the Milvus server did not start: {exc}")
            return 1
        write_state(args.folder, uri=f"http://127.0.0.1:{listener.getsockname()[1]}",
                    start_seconds=round(time.monotonic() - started, 1), milvus_pid=server.milvus_pid)
        asyncio.run(relay(listener, args.owner, server))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
