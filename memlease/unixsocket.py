"""The server's Unix socket and its file, as memcached's ``-s`` and Redis's ``unixsocket``.

The file is made with the mode asked for (no moment with another), a stale one left by a
crash is replaced, and the file is removed when the server closes the socket, but only
while it is still ours.  A path that is not a socket, or one a live server answers on,
is refused: a start must never take over another server's clients or clobber a file.
"""

import os
import socket
import stat
from typing import Optional, Tuple

DEFAULT_MODE = 0o660  # the server's user and group may connect, others not
BACKLOG = 4096
PROBE_SECONDS = 1.0  # how long a start waits to learn whether a socket file is live


class UnixSocketError(OSError):
    """A Unix socket that cannot be made, said in one line that names the path."""


class UnixListener:
    """A listening Unix socket and the file it is bound to."""

    def __init__(self, path: str, mode: int = DEFAULT_MODE) -> None:
        self.path = path
        self.mode = mode
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _bind_with_mode(sock, path, mode)
            self._identity: Optional[Tuple[int, int]] = _identity(path)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise UnixSocketError(
                "cannot listen on the Unix socket %s: %s" % (path, exc.strerror or exc)
            ) from None
        self.sock = sock

    def close(self) -> None:
        """Close the socket and remove its file, unless another file has taken its place."""
        self.sock.close()
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            if _identity(self.path) == identity:
                os.unlink(self.path)
        except OSError:  # gone already, or its directory is not ours to change
            pass


def _identity(path: str) -> Tuple[int, int]:
    """What tells one file from another at the same path: device and inode."""
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _bind_with_mode(sock: socket.socket, path: str, mode: int) -> None:
    """Bind ``sock`` to ``path``, the file made with ``mode`` at once (through the umask:
    a chmod after the bind would leave a moment with the default mode)."""
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)


def _clear_stale(path: str) -> None:
    """Remove a socket file no server answers on; refuse anything else found at ``path``."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnixSocketError("cannot use %s: %s" % (path, exc.strerror or exc)) from None
    if not stat.S_ISSOCK(info.st_mode):
        raise UnixSocketError(
            "%s exists and is not a socket: remove it or choose another path for --unix" % path
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_SECONDS)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a crashed server's file
        pass
    except socket.timeout:  # a full backlog: someone listens
        raise UnixSocketError("a server already listens on the Unix socket %s" % path) from None
    except OSError as exc:
        raise UnixSocketError(
            "cannot tell whether a server listens on %s: %s" % (path, exc.strerror or exc)
        ) from None
    else:
        raise UnixSocketError("a server already listens on the Unix socket %s" % path)
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UnixSocketError(
            "cannot remove the stale socket %s: %s" % (path, exc.strerror or exc)
        ) from None
