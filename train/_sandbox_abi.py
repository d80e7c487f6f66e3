"""The Linux ABI that `_sandbox_helper.py` uses: namespace, mount and prctl constants, the
pivot_root syscall numbers and a ctypes wrapper of the libc calls. Standard library only: the
helper runs as a script under `python -I -S` and loads this file from its own folder."""

from __future__ import annotations

import os

# ---------------------------------------------------------------- Linux constants (stable ABI)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    ("mount_ns", CLONE_NEWNS),
    ("pid_ns", CLONE_NEWPID),
    ("net_ns", CLONE_NEWNET),
    ("ipc_ns", CLONE_NEWIPC),
    ("uts_ns", CLONE_NEWUTS),
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_KEEP = 1 | 2 | 4 | 8 | 16 | 64 | 1024 | 2048 | 4096  # statvfs f_flag bits that are MS_* flags
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


class Libc:
    """The libc calls the helper makes (ctypes); a failure raises OSError naming the call."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        self.libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        self.libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

    def _check(self, ret: int, what: str) -> None:
        if ret != 0:
            e = self.ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(flags), f"unshare({flags:#x})")

    def mount(
        self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None
    ) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        self._check(self.libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")

    def umount2(self, path: str, flags: int) -> None:
        self._check(self.libc.umount2(path.encode(), flags), f"umount {path}")

    def prctl(self, option: int, arg: int = 0) -> None:
        self._check(self.libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")

    def pivot_root(self, new: str, old: str) -> None:
        import platform

        nr = SYS_PIVOT_ROOT.get(platform.machine())
        if nr is None:
            raise OSError(0, f"pivot_root: syscall number unknown on {platform.machine()}")
        self._check(self.libc.syscall(self.ctypes.c_long(nr), new.encode(), old.encode()), "pivot_root")

    def sethostname(self, name: str) -> None:
        self._check(self.libc.sethostname(name.encode(), len(name)), "sethostname")
