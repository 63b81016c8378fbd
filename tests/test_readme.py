"""The README's examples, run against a real server so that they cannot go stale.

Every ```python block runs as its own program, from another directory with the project
on PYTHONPATH (as the README tells a newcomer to do), with the port 412 in it replaced
by the test server's.  A block that cannot run here (one that needs several hosts or
certificates) is preceded by the line ``<!-- test_readme: skip -->``.  The quick
start's session is typed as shown, and must print what the README says it prints; the
picture of the pool is drawn again from the leases the README says it shows.
"""

import contextlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from memlease_client import MemLeaseClient
from tests.helpers import ServerProcess, server_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SKIP_MARK = "<!-- test_readme: skip"
PORT_IN_EXAMPLES = re.compile(r"\b412\b")


def python_blocks(text: str) -> List[Tuple[int, str]]:
    """(line number, code) of each ```python block not marked to be skipped."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not before.startswith(SKIP_MARK):
            blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def quick_start_session(text: str) -> List[Tuple[str, List[str]]]:
    """The quick start's first session: each ``$ command`` and the lines it prints."""
    section = text[text.index("## Quick start") :]
    lines = section.split("\n    $ ", 1)[1].split("\n\n", 1)[0].split("\n")
    session: List[Tuple[str, List[str]]] = []
    for line in ["    $ " + lines[0]] + lines[1:]:
        line = line[4:]
        if line.startswith("$ "):
            session.append((line[2:], []))
        else:
            session[-1][1].append(line)
    return session


def environment() -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MEMLEASE_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A server as the README's reader starts one: 16 MiB, quiet, on a port from the OS."""
    with server_process("16M", "-q") as server:
        yield server.port


def test_the_readme_has_python_examples_and_a_session() -> None:
    assert len(python_blocks(README)) >= 2
    commands = [shlex.split(command) for command, _ in quick_start_session(README)]
    assert [[word for word in words[3:] if word != "412"][0] for words in commands] == [
        "lease",
        "set",
        "get",
    ]


def test_the_api_section_shows_asyncio_and_the_pool_map() -> None:
    api = README[README.index("## The Python API") : README.index("## The server")]
    codes = [code for _, code in python_blocks(api)]
    assert any("AsyncMemLeaseClient" in code and "asyncio.run(" in code for code in codes)
    assert any(".pool_map(" in code for code in codes)
    assert "`pool_map(cells=1024)`" in api


@pytest.mark.parametrize(
    "line, code", python_blocks(README), ids=[str(line) for line, _ in python_blocks(README)]
)
def test_python_example_runs(line: int, code: str, port: int, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PORT_IN_EXAMPLES.sub(str(port), code)],
        cwd=str(tmp_path),
        env=environment(),
        capture_output=True,
        timeout=60,
    )
    assert (out.returncode, out.stderr) == (0, b""), "README.md line %d: %s" % (
        line,
        out.stderr.decode(errors="replace"),
    )


SHOWN_ID = "0b8e6c1a-5d8f-4e0c-9a47-2f1d3c5b7e90"  # the README's id; each run gets its own


def test_quick_start_session_prints_what_the_readme_shows(port: int) -> None:
    lease_id = SHOWN_ID
    for command, shown in quick_start_session(README):
        words = shlex.split(command)
        assert words[:3] == ["python3", "memlease_client.py", "localhost"], command
        if words[3] == "412":
            del words[3]
        argv = [sys.executable, str(ROOT / "memlease_client.py"), "127.0.0.1", str(port)]
        argv += [lease_id if word == SHOWN_ID else word for word in words[3:]]
        out = subprocess.run(argv, capture_output=True, timeout=30, env=environment())
        printed = out.stdout.decode().splitlines()
        if words[3] == "lease":
            lease_id = printed[0].rsplit(" ", 1)[-1]
        assert (out.returncode, out.stderr) == (0, b""), command
        assert printed == [line.replace(SHOWN_ID, lease_id) for line in shown], command


def test_the_map_in_the_readme_is_what_its_pattern_of_leases_draws() -> None:
    section = README[README.index("**A picture of the pool.**") :]
    shown = section.split("    $ python3 memlease_client.py localhost map\n", 1)[1]
    shown_lines = [line[4:] for line in shown.split("\n\n", 1)[0].splitlines()]
    with server_process("16M", "-q") as server, MemLeaseClient("127.0.0.1", server.port) as client:
        client.lease(4 << 20, 60000)
        middle = client.lease(1 << 20, 60000)
        small = [client.lease(40 << 10, 60000) for _ in range(24)]
        client.lease(2 << 20, 60000)
        for _ in range(40):
            client.lease(3000, 60000)
        for lease_id in [middle] + small[::2]:
            client.release(lease_id)
        out = subprocess.run(
            [sys.executable, str(ROOT / "memlease_client.py"), "127.0.0.1", str(server.port)]
            + ["map"],
            capture_output=True,
            timeout=30,
            env=dict(environment(), PYTHONIOENCODING="utf-8"),
        )
    assert (out.returncode, out.stderr) == (0, b"")
    assert out.stdout.decode("utf-8").splitlines() == shown_lines


TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements-dev.txt"
    " && .venv/bin/python -m pytest -q"
)


def test_the_readme_and_ci_run_one_test_command_in_a_venv() -> None:
    """Debian's own python3 refuses pip installs outside a venv (PEP 668)."""
    assert "\n    %s\n" % TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".venv/" in ignored


@contextlib.contextmanager
def something_on_port_412() -> Iterator[None]:
    """The quick start's server on 127.0.0.1:412, as the README leaves it; if 412 is taken
    already, whatever holds it serves the same purpose."""
    server = ServerProcess("412", "2048", "--bind", "127.0.0.1", "-q")
    try:
        assert wait_for(lambda: server.proc.poll() is not None or "listening" in server.output())
        if "not permitted" in server.output():
            pytest.skip("port 412 needs root here")
        yield
    finally:
        server.stop()


def test_the_tests_of_the_default_port_pass_while_something_listens_on_412() -> None:
    """The quick start leaves a server on 412: the tests that speak of that port pass anyway."""
    with something_on_port_412():
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + ["test_memlease.py::test_cli_port_defaults_to_412", "tests/test_readme.py"]
            + ["-k", "not listens_on_412"],
            cwd=str(ROOT),
            capture_output=True,
            timeout=240,
        )
    assert out.returncode == 0, out.stdout.decode(errors="replace")[-3000:]
