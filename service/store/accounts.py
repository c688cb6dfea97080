"""Running a program as another account from a process that runs gRPC.

PostgreSQL refuses to run as root, so the embedded database run by root (and
``make cluster``, and the tests that start servers of their own) runs
PostgreSQL's programs as an unprivileged account. :mod:`subprocess` changes
the account in the child between ``fork()`` and ``exec()`` when given
``user``, ``group`` or ``extra_groups``, and for that gives up ``vfork()``:
the ``fork()`` it makes instead runs gRPC's at-fork handlers in the child, and
while gRPC's threads are busy those handlers can crash the child before it
runs the program (a SIGSEGV or SIGABRT, reported as the program's own exit
status -11 or -6).

:func:`as_account` prefixes the command instead with a new Python interpreter
(isolated, without ``site``) that leaves every supplementary group, takes the
account's group and user, and replaces itself with the program. The process
that starts it changes no account, so :mod:`subprocess` starts it with
``vfork()`` and no at-fork handler runs.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Sequence

# The group is taken before the user, which then can no longer change it.
_SWITCH = (
    "import os, sys; os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1])); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


def as_account(account: pwd.struct_passwd, command: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``command`` (its program an absolute path) run as ``account`` in its own group alone, for :mod:`subprocess`.

    Run the result without ``user``, ``group`` or ``extra_groups``.
    """
    program, *args = (os.fspath(part) for part in command)
    if not os.path.isabs(program):
        raise ValueError(f"{program!r}: the program to run as {account.pw_name} needs an absolute path")
    return [sys.executable, "-I", "-S", "-c", _SWITCH, str(account.pw_uid), str(account.pw_gid), program, *args]
