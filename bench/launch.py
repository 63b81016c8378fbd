"""What both benchmarks share: the target a load is aimed at, and our server started on a
port of the OS's choosing and stopped again."""

import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent


class Target(NamedTuple):
    name: str
    port: int
    pid: int  # whose CPU time is read, where /proc has it
    unix: str = ""  # a Unix socket's path: reached through it, not the port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ours(
    pool: str, log: "tempfile._TemporaryFileWrapper[str]", unix: Optional[str] = None
) -> Tuple["subprocess.Popen[bytes]", Target]:
    """Our server on a loopback port, and on the Unix socket ``unix`` too when given."""
    also = [] if unix is None else ["--unix", unix]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "memlease_server.py"), "0", pool, "--bind", "127.0.0.1", "-q"]
        + also,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(200):
        match = re.search(r"starting server on port (\d+)", Path(log.name).read_text())
        if match:
            return proc, Target("memlease", int(match.group(1)), proc.pid)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("memlease_server did not start: " + Path(log.name).read_text())


def stop(proc: "subprocess.Popen[bytes]") -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
