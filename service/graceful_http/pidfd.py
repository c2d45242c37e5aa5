"""Process identities that PID reuse cannot fake: pidfd inode ids.

systemd >= 257 takes `MAINPIDFDID=` next to `MAINPID=` and refuses the new
main PID if that PID now names another process; newer sd_listen_fds() checks
`LISTEN_PIDFDID` next to `LISTEN_PID`. Both are the inode number of a pidfd,
which identifies a process only on kernels where every pidfd has an inode of
its own (pidfs, Linux 6.9); before that all pidfds share one anonymous inode.
So the feature is detected by trying, and where it is missing the fields are
simply not sent: systemd 252 ignores a field it does not know anyway.
"""

from __future__ import annotations

import functools
import os


def inode_id(pid: int) -> int | None:
    """`pid`'s pidfd inode id, or None where pidfds have none of their own (or the process is gone)."""
    if not _ids_are_distinct():
        return None
    return _inode(pid)


def _inode(pid: int) -> int | None:
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError, ValueError):
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@functools.cache
def _ids_are_distinct() -> bool:
    """Do two processes' pidfds have different inodes (pidfs), rather than one shared anonymous inode?"""
    mine, parent = _inode(os.getpid()), _inode(os.getppid())
    return mine is not None and parent is not None and mine != parent
