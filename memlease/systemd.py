"""Socket activation: the listening sockets systemd hands over, as sd_listen_fds(3) reads them.

systemd binds the port (412 needs no root in the server then), starts the server with the
sockets as descriptors 3, 4, ... and says so in LISTEN_FDS and LISTEN_PID.  LISTEN_PID
guards against a child inheriting variables meant for its parent.
"""

import os
import socket
from typing import List

FIRST_FD = 3  # SD_LISTEN_FDS_START


class ActivationError(Exception):
    """systemd's variables name descriptors this server cannot serve on."""


def listen_fds() -> List[socket.socket]:
    """The listening sockets passed to this process; none when it was not socket-activated.

    The variables are removed, so a process this one starts does not take them as its own;
    the descriptors are made close-on-exec for the same reason.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise ActivationError("LISTEN_FDS=%r is not a number of descriptors" % count)
    sockets = []
    for fd in range(FIRST_FD, FIRST_FD + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError("descriptor %d from systemd: %s" % (fd, exc.strerror)) from None
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if not (tcp and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()
            raise ActivationError("descriptor %d from systemd is not a listening TCP socket" % fd)
        sockets.append(sock)
    return sockets
