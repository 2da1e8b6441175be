"""Who is on the other end of a Unix socket: the kernel's word, not the caller's.

``SO_PEERCRED`` gives the peer's pid, uid and gid as they were when it connected;
``SO_PEERGROUPS`` (Linux 4.13+) its supplementary groups. A peer's principals (in
:mod:`kms_agent.policy`'s spelling) are its uid's and, for each of its groups, the group's
number and, where the group database has one, its name: ``unix:uid:1001``,
``unix:gid:1001``, ``unix:gid:kms-readers``. A TCP peer has none.
"""

from __future__ import annotations

import functools
import grp
import socket
import struct

from kms_agent.policy import peer_principals

#: ``SO_PEERGROUPS`` where the socket module lacks the constant (Linux's value).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Supplementary groups read (NGROUPS_MAX is 65536; a peer in more is cut here).
MAX_GROUPS = 256
_CRED = struct.Struct("3i")


@functools.lru_cache(maxsize=1024)
def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def credentials(sock: socket.socket) -> tuple[int, int, tuple[int, ...]] | None:
    """The peer's (pid, uid, gids), or None for a socket that is not a Unix one."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = _CRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        )
    except OSError:
        return None
    groups = [gid]
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups += struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        pass  # an older kernel: the primary group alone
    return pid, uid, tuple(dict.fromkeys(groups))


def principals(uid: int, gids: tuple[int, ...]) -> tuple[str, ...]:
    names: list[str] = []
    for gid in gids:
        names.append(str(gid))
        name = group_name(gid)
        if name is not None and name != str(gid):
            names.append(name)
    return peer_principals(uid, names)
