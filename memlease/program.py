"""What both command lines share: the name the user ran them by, and the version line.

A user who ran ``memlease-server`` must read ``memlease-server`` in its usage and errors,
and one who ran ``python3 memlease_server.py`` must read that.
"""

import os
import sys

from memlease import __version__


def program_name(fallback: str) -> str:
    """The command as the user typed it (``memlease-server``, ``memlease_server.py``)."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else fallback


def how_to_run(name: str) -> str:
    """What to type to run the command: a script needs ``python3`` before it."""
    return "python3 " + name if name.endswith(".py") else name


def version_line(name: str) -> str:
    """``memlease-client 2.0.0``: what ``--version`` prints."""
    return "%s %s" % (name, __version__)
