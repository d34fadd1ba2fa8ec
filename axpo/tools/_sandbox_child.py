"""Child side of the python sandbox (see axpo.tools.python_sandbox for the design and its limits).

The host runs `python -I -S -B -u -X utf8 <this file> CONFIG_JSON` in a fresh process; this file is
run by path, so it imports nothing from axpo (the host imports it only for the constants). Steps:
read the code (its file lies outside the sandbox directory), set rlimits, apply the kernel layers
(Landlock, seccomp) when available, install the audit hook, run the code, report the outcome.

Verdict protocol, on the pipe whose fd is in CONFIG: one line per event, "<kind>\\t<message>" with
backslashes and newlines escaped; kinds: start (with the layers applied), violation, exception,
memory, cpu, done. The exit status repeats the outcome (EXIT_*) in case the code closed the pipe.
Model code shares this process, so it can write to the pipe or exit early: it can make its own
run look *worse* (or end it with "no error" and its own output), which harms nobody; the host
never trusts the verdict for anything but the error kind it reports back to the model.
"""
import sys

EXIT_EXCEPTION = 101
EXIT_VIOLATION = 102
EXIT_MEMORY = 103
EXIT_CPU = 104
EXIT_SETUP = 105
CODE_FILENAME = "<code>"

# Imports refused: native-code escape hatches, and C modules that reach files or processes without
# raising audit events. posix, time, _signal and _posixsubprocess are loaded before the code runs
# (the last so that `import subprocess`, and asyncio with it, work): an import event for them means
# a re-import that would bring back the functions removed below.
# sqlite3 opens files (ATTACH DATABASE) and counts none of them, in C; spwd / pwd / grp read the
# host's account files (/etc/shadow among them) in C. A module is recognised by the file loaded
# (an extension's file name), not only by the name it is imported under.
BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "_posixsubprocess", "_posixshmem", "_multiprocessing", "readline",
    "_dbm", "_gdbm", "_tkinter", "posix", "time", "_signal", "_sqlite3", "spwd", "pwd", "grp",
})
# loaded before the code runs and kept (defused by REMOVED_FUNCTIONS); the other blocked ones are
# unloaded if anything loaded them, so that importing them raises the import event
KEPT_MODULES = frozenset({"posix", "time", "_signal", "_posixsubprocess"})
BLOCKED_PREFIXES = ("_test", "_xx", "_ctypes", "ctypes.")

# Functions without audit events that act on other processes or make special files: replaced by
# stubs that report a violation.
REMOVED_FUNCTIONS = {
    "posix": ("mkfifo", "mknod", "pidfd_open", "chroot", "setpriority", "sched_setaffinity",
              "sched_setscheduler", "sched_setparam", "setns", "unshare"),
    "os": ("mkfifo", "mknod", "pidfd_open", "chroot", "setpriority", "sched_setaffinity",
           "sched_setscheduler", "sched_setparam", "setns", "unshare"),
    "time": ("clock_settime", "clock_settime_ns"),
    "_signal": ("pidfd_send_signal",),
    "signal": ("pidfd_send_signal",),
    "_posixsubprocess": ("fork_exec",),  # subprocess.Popen raises an audit event; this does not
    # re-creates a builtin module from its first initialisation: the original posix functions
    # (every builtin the stdlib needs is imported before the code runs)
    "_imp": ("create_builtin",),
}
# fcntl commands and ioctl requests that make the kernel signal another process (SIGIO / a chosen
# signal to the owner of a file), and the ioctls that change inode flags with a read-only fd
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
SIGNAL_FCNTLS = (F_SETOWN, F_SETSIG, F_SETOWN_EX)
SIGNAL_IOCTLS = (0x8901, 0x8902, 0x5410)  # FIOSETOWN, SIOCSPGRP, TIOCSPGRP
FS_FLAG_IOCTLS = (0x40086602, 0x40046602, 0x401C5820)  # FS_IOC_SETFLAGS, its 32-bit twin, FS_IOC_FSSETXATTR

# Audit events refused outright, with what they mean for the message.
REFUSED_EVENTS = {
    "os.fork": "starting processes", "os.forkpty": "starting processes", "os.exec": "starting processes",
    "os.posix_spawn": "starting processes", "os.spawn": "starting processes",
    "os.system": "starting processes", "subprocess.Popen": "starting processes",
    "os.startfile": "starting processes", "webbrowser.open": "starting processes",
    "os.kill": "sending signals to processes", "os.killpg": "sending signals to processes",
    "os.link": "creating links", "os.symlink": "creating links",
    # file metadata: refused everywhere, as seccomp does (Landlock does not cover it)
    "os.chmod": "changing file metadata", "os.chown": "changing file metadata",
    "os.utime": "changing file metadata", "os.setxattr": "changing file metadata",
    "os.removexattr": "changing file metadata", "os.chflags": "changing file metadata",
    "os.lchflags": "changing file metadata",
    "resource.setrlimit": "changing resource limits",
    "cpython.PyInterpreterState_New": "creating sub-interpreters",
    "gc.get_objects": "gc introspection", "gc.get_referrers": "gc introspection",
    "gc.get_referents": "gc introspection",
    "marshal.load": "unmarshalling code",
    "sys.settrace": "tracing", "sys.setprofile": "tracing",
    "sqlite3.enable_load_extension": "loading native code", "sqlite3.load_extension": "loading native code",
}
REFUSED_PREFIXES = {"socket.": "network access", "ctypes.": "ctypes", "syslog.": "the system log"}
READ_EVENTS = ("os.listdir", "os.scandir", "os.getxattr", "os.listxattr")
WRITE_EVENTS = {  # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    "os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),),
}


class SandboxViolation(BaseException):
    """Raised by the audit hook. A BaseException, so that `except Exception` in model code does not
    swallow it (the violation is reported on the verdict pipe before it is raised either way)."""


def _make_reporter(verdict_fd):
    import posix
    write = posix.write

    def report(kind, message=""):
        line = kind + "\t" + message.replace("\\", "\\\\").replace("\n", "\\n") + "\n"
        try:
            write(verdict_fd, line.encode("utf-8", "backslashreplace"))
        except OSError:  # the code closed the pipe: the exit status still tells the outcome
            pass
    return report


def _set_rlimits(cfg):
    import resource

    def lower(which, soft, hard):
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(which, (min(soft, hard), hard))

    lower(resource.RLIMIT_CORE, 0, 0)
    lower(resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"])
    lower(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU, then SIGKILL a second later
    lower(resource.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"])
    lower(resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"])
    # ignored for root (and it counts all of the user's processes otherwise); fork is also refused
    # by the audit hook and by seccomp
    lower(resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"])


# --- kernel layers ---------------------------------------------------------------------------

_SYSCALLS = {  # the syscalls seccomp refuses (or checks), per architecture
    "x86_64": dict(
        fork=57, vfork=58, execve=59, execveat=322, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, setrlimit=160,
        io_uring_setup=425, unshare=272, setns=308, keyctl=250, add_key=248, request_key=249, bpf=321,
        perf_event_open=298, userfaultfd=323, mount=165, umount2=166, pivot_root=155, chroot=161,
        setpriority=141, sched_setaffinity=203, sched_setscheduler=144, sched_setparam=142,
        sched_setattr=314, clock_settime=227, settimeofday=164, adjtimex=159, clock_adjtime=305,
        mknod=133, mknodat=259, kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313,
        delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163, quotactl=179, quotactl_fd=443,
        open_by_handle_at=304, name_to_handle_at=303, move_mount=429, fsopen=430, fsmount=432,
        fsconfig=431, open_tree=428, mount_setattr=442, ioprio_set=251, sethostname=170,
        setdomainname=171, kcmp=312, migrate_pages=256, move_pages=279, syslog=103, process_madvise=440,
        process_mrelease=448, fanotify_init=300, connect=42, bind=49, sendmsg=46, sendmmsg=307,
        tkill=200, iopl=172, ioperm=173, vhangup=153, uselib=134, lookup_dcookie=212,
        # System V IPC: segments outlive the process (and there may be no IPC namespace)
        shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220,
        msgget=68, msgsnd=69, msgrcv=70, msgctl=71,
        # file metadata, which Landlock does not cover
        chmod=90, fchmod=91, fchmodat=268, fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260,
        utime=132, utimes=235, utimensat=280, futimesat=261, setxattr=188, lsetxattr=189,
        fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199, setxattrat=463,
        removexattrat=466, file_setattr=469,
        # checked, not refused outright
        clone=56, clone3=435, kill=62, tgkill=234, prlimit64=302, socket=41, sendto=44, ioctl=16,
        fcntl=72, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297),
    "aarch64": dict(
        execve=221, execveat=281, ptrace=117, process_vm_readv=270, process_vm_writev=271,
        pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, setrlimit=164, io_uring_setup=425,
        unshare=97, setns=268, keyctl=219, add_key=217, request_key=218, bpf=280, perf_event_open=241,
        userfaultfd=282, mount=40, umount2=39, pivot_root=41, chroot=51, setpriority=140,
        sched_setaffinity=122, sched_setscheduler=119, sched_setparam=118, sched_setattr=274,
        clock_settime=112, settimeofday=170, adjtimex=171, clock_adjtime=266, mknodat=33, kexec_load=104,
        kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, reboot=142,
        swapon=224, swapoff=225, acct=89, quotactl=60, quotactl_fd=443, open_by_handle_at=265,
        name_to_handle_at=264, move_mount=429, fsopen=430, fsmount=432, fsconfig=431, open_tree=428,
        mount_setattr=442, ioprio_set=30, sethostname=161, setdomainname=162, kcmp=272,
        migrate_pages=238, move_pages=239, syslog=116, process_madvise=440, process_mrelease=448,
        fanotify_init=262, connect=203, bind=200, sendmsg=211, sendmmsg=269, tkill=130, vhangup=58,
        lookup_dcookie=18,
        msgget=186, msgctl=187, msgrcv=188, msgsnd=189, semget=190, semctl=191, semtimedop=192, semop=193,
        shmget=194, shmctl=195, shmat=196, shmdt=197,
        fchmod=52, fchmodat=53, fchmodat2=452, fchown=55, fchownat=54, utimensat=88, setxattr=5,
        lsetxattr=6, fsetxattr=7, removexattr=14, lremovexattr=15, fremovexattr=16, setxattrat=463,
        removexattrat=466, file_setattr=469,
        clone=220, clone3=435, kill=129, tgkill=131, prlimit64=261, socket=198, sendto=206, ioctl=29,
        fcntl=25, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240),
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_CHECKED = ("clone", "clone3", "kill", "tgkill", "prlimit64", "socket", "sendto", "ioctl", "fcntl",
            "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def _seccomp_program(arch, pid):
    """A classic-BPF seccomp filter: EPERM for the syscalls above; clone only for threads; clone3
    answers ENOSYS (glibc then falls back to clone); kill/tgkill/rt_sigqueueinfo/rt_tgsigqueueinfo
    only to this process; prlimit64 only to read; socket only AF_UNIX (asyncio's socketpair);
    sendto only without an address; ioctl but the ones that set inode flags or a file's signal
    owner; fcntl but F_SETOWN / F_SETOWN_EX / F_SETSIG (the kernel would signal that owner, any
    process, on I/O). File metadata syscalls (chmod, chown, utime, xattr) are refused: Landlock
    does not cover them, and a read-only fd is enough for some."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    table = _SYSCALLS[arch]

    def lo(i):
        return 16 + 8 * i

    def hi(i):
        return 20 + 8 * i

    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, _AUDIT_ARCH[arch]), (RET, 0, 0, EPERM), (LD, 0, 0, 0)]
    if arch == "x86_64":  # the x32 ABI: syscall numbers with bit 30 set
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]
    for name, nr in table.items():
        if name not in _CHECKED:
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    null_arg = lambda i: [(LD, 0, 0, lo(i)), (JEQ, 0, 2, 0), (LD, 0, 0, hi(i)), (JEQ, 1, 0, 0),
                          (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]

    def refuse_values(i, values):  # EPERM when the low 32 bits of argument i are one of values
        n = len(values)
        return [(LD, 0, 0, lo(i))] + [(JEQ, n - j, 0, v) for j, v in enumerate(values)] + [
            (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    to_self = [(LD, 0, 0, lo(0)), (JEQ, 1, 0, pid), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    bodies = {
        "clone": [(LD, 0, 0, lo(0)), (JSET, 0, 1, 0x00010000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)],
        "clone3": [(RET, 0, 0, ENOSYS)],
        "kill": [(LD, 0, 0, lo(0)), (JEQ, 2, 0, pid), (JEQ, 1, 0, 0), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)],
        "tgkill": to_self, "rt_sigqueueinfo": to_self, "rt_tgsigqueueinfo": to_self,
        "prlimit64": null_arg(2),
        "socket": [(LD, 0, 0, lo(0)), (JEQ, 1, 0, 1), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)],
        "sendto": null_arg(4),
        "ioctl": refuse_values(1, FS_FLAG_IOCTLS + SIGNAL_IOCTLS),
        "fcntl": refuse_values(1, SIGNAL_FCNTLS),
    }
    for name in _CHECKED:
        body = bodies[name]
        prog += [(JEQ, 0, len(body), table[name])] + body
    prog.append((RET, 0, 0, ALLOW))
    return prog


def _apply_kernel_layers(cfg, read_roots, hidden):
    """Landlock (files, TCP, signals) and seccomp (processes, sockets, privileged syscalls).

    Returns short descriptions of what was applied (or why not). Both layers are irreversible and
    inherited; ctypes is needed to reach them and is unloaded again afterwards."""
    if not (cfg["landlock"] or cfg["seccomp"]) or not sys.platform.startswith("linux"):
        return []
    applied = []
    try:
        _apply_landlock_and_seccomp(cfg, read_roots, hidden, applied)
    except Exception as e:  # a missing libc symbol, an odd platform: run with the other layers
        applied.append(f"kernel-layers-failed:{type(e).__name__}")
    # unload ctypes: a later `import ctypes` by the code then raises an import event (refused)
    for name in [n for n in sys.modules if n == "ctypes" or n.startswith("ctypes.") or n == "_ctypes"]:
        del sys.modules[name]
    return applied


def _apply_landlock_and_seccomp(cfg, read_roots, hidden, applied):
    import os
    try:
        import ctypes
    except ImportError:
        applied.append("no-ctypes")
        return
    libc = ctypes.CDLL(None, use_errno=True)
    c_long, c_ulong = ctypes.c_long, ctypes.c_ulong

    def syscall(nr, *args):
        return libc.syscall(c_long(nr), *args)

    if libc.prctl(ctypes.c_int(38), c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0)) != 0:  # NO_NEW_PRIVS
        applied.append("no_new_privs-failed")
        return

    if cfg["landlock"]:
        abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # the Landlock ABI version
        if abi >= 1:
            READ_FILE, READ_DIR, WRITE_FILE = 1 << 2, 1 << 3, 1 << 1
            handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) \
                | (1 << 15 if abi >= 5 else 0)
            tree_rights = handled & (READ_FILE | READ_DIR | WRITE_FILE | 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8
                                     | 1 << 13 | 1 << 14)  # remove dir/file, make dir/reg, refer, truncate

            class RulesetAttr(ctypes.Structure):
                _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

            class PathBeneath(ctypes.Structure):
                _pack_ = 1
                _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

            # net: TCP bind and connect; scoped: signals and abstract unix sockets
            attr = RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
            size = 8 if abi < 4 else 16 if abi < 6 else 24
            ruleset = syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
            if ruleset < 0:
                applied.append(f"landlock-failed:{ctypes.get_errno()}")
            else:
                rules = [(cfg["work"], tree_rights)]
                hidden_dirs = {p.rstrip("/") for p in hidden}
                for root in read_roots:
                    if root == cfg["work"]:
                        continue
                    children = [os.path.join(root, c) for c in os.listdir(root)] if any(
                        os.path.dirname(h) == root for h in hidden_dirs) else [root]
                    # a root holding site-packages: everything in it but that (Landlock only allows)
                    rules += [(c, READ_FILE | READ_DIR) for c in children if os.path.realpath(c) not in hidden_dirs]
                # shared libraries that stdlib extensions load (zlib, libcrypto...): read-only files
                rules += [(path, READ_FILE) for path in _library_paths()]
                ok = True
                for path, rights in rules:
                    try:
                        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                    except OSError:
                        continue
                    if not os.path.isdir(path):
                        rights &= READ_FILE | WRITE_FILE | 1 << 14 | 1  # only file rights apply to files
                    rule = PathBeneath(rights, fd)
                    if syscall(445, c_long(ruleset), c_long(1), ctypes.byref(rule), c_long(0)) != 0:
                        ok = False
                    os.close(fd)
                if ok and syscall(446, c_long(ruleset), c_long(0)) == 0:
                    applied.append(f"landlock-abi{abi}")
                else:
                    applied.append(f"landlock-failed:{ctypes.get_errno()}")
                os.close(ruleset)
        else:
            applied.append("no-landlock")

    if cfg["seccomp"]:
        arch = os.uname().machine
        if arch in _SYSCALLS:
            class SockFilter(ctypes.Structure):
                _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                            ("k", ctypes.c_uint32)]

            class SockFprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

            program = _seccomp_program(arch, os.getpid())
            filters = (SockFilter * len(program))(*[SockFilter(c, jt, jf, k) for c, jt, jf, k in program])
            fprog = SockFprog(len(program), filters)
            if libc.prctl(ctypes.c_int(22), c_ulong(2), ctypes.byref(fprog), c_ulong(0), c_ulong(0)) == 0:
                applied.append("seccomp")
            else:
                applied.append(f"seccomp-failed:{ctypes.get_errno()}")
        else:
            applied.append(f"no-seccomp-table-for-{arch}")


def _library_paths():
    """What dlopen of a standard-library extension needs to read: the system's library trees, the
    loader cache, and the shared-library files (not the trees) beside the libraries already mapped
    (e.g. a pyenv prefix's lib/ with libpython, whose tree also holds site-packages)."""
    import os
    system = {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
    paths = set(system) | {"/etc/ld.so.cache"}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if not (path.startswith("/") and ".so" in path):
                    continue
                folder = os.path.dirname(os.path.realpath(path))
                if any(folder == d or folder.startswith(d + "/") for d in system):
                    continue
                for name in os.listdir(folder):
                    if ".so" in name and os.path.isfile(os.path.join(folder, name)):
                        paths.add(os.path.join(folder, name))
    except OSError:
        pass
    return sorted(p for p in paths if os.path.exists(p))


# --- the audit hook --------------------------------------------------------------------------

def _make_audit_hook(work, read_roots, hidden, report, max_files):
    """The audit hook: refuses the events above and file access outside the allowed trees.

    Everything it uses is bound here (functions of C modules, builtins), so that model code cannot
    redirect it by patching modules or builtins, and it calls no Python code that model code could
    have written (paths must be str, bytes, file descriptors, os.DirEntry or pathlib paths)."""
    import pathlib
    import posix
    import stat as stat_module
    import types

    lstat, stat, readlink, getcwd = posix.lstat, posix.stat, posix.readlink, posix.getcwd
    p_open, p_read, p_close = posix.open, posix.read, posix.close
    S_ISLNK, S_ISDIR = stat_module.S_ISLNK, stat_module.S_ISDIR
    O_CREAT, O_RDONLY, O_CLOEXEC = posix.O_CREAT, posix.O_RDONLY, posix.O_CLOEXEC
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    str_copy, bytes_decode = str.__str__, bytes.decode
    type_, issubclass_, memoryview_, repr_, len_ = type, issubclass, memoryview, repr, len
    str_t, bytes_t, int_t = str, bytes, int
    OSError_, ValueError_, AttributeError_ = OSError, ValueError, AttributeError
    Violation = SandboxViolation
    fs_encoding = sys.getfilesystemencoding()
    direntry_t, direntry_fspath = posix.DirEntry, posix.DirEntry.__fspath__
    posix_path_t, pure_posix_path_t = pathlib.PosixPath, pathlib.PurePosixPath
    slot = pathlib.PurePath.__dict__.get("_str")  # the cached str of a path (CPython 3.10-3.13)
    path_str_slot = slot.__get__ if slot is not None else posix.fspath
    refused_events, refused_prefixes = dict(REFUSED_EVENTS), tuple(REFUSED_PREFIXES.items())
    read_events, write_events = frozenset(READ_EVENTS), dict(WRITE_EVENTS)
    blocked_modules, blocked_prefixes = BLOCKED_MODULES, BLOCKED_PREFIXES
    work_prefix = work + "/"
    read_roots = tuple(read_roots)
    read_prefixes = tuple(root + "/" for root in read_roots)
    # third-party packages installed inside the standard library's tree are not the standard library
    hidden_prefixes = tuple(hidden)
    # extension modules: only the standard library's own directory of them (lib-dynload)
    native_prefixes = tuple(p for p in read_prefixes if p.rstrip("/").endswith("/lib-dynload"))
    signal_fcntls, signal_ioctls = SIGNAL_FCNTLS, SIGNAL_IOCTLS + FS_FLAG_IOCTLS
    created = set()
    last_pyc = [None]
    getframe = sys._getframe
    coroutine_code = types.coroutine.__code__  # the one stdlib caller of code.replace (flags only)

    def violate(message):
        report("violation", message)
        raise Violation("sandbox: " + message + " (the code may only use files in its working "
                        "directory, and no network, processes or native code)")

    def as_text(path):
        """The path as an exact str; None for a file descriptor."""
        t = type_(path)
        if issubclass_(t, int_t):
            return None
        if issubclass_(t, str_t):
            return str_copy(path)
        if issubclass_(t, bytes_t):
            return bytes_decode(path, fs_encoding, "surrogateescape")
        if t is direntry_t:
            return as_text(direntry_fspath(path))
        if t is posix_path_t or t is pure_posix_path_t:
            try:
                return str_copy(path_str_slot(path))  # set by the conversion that preceded the event
            except AttributeError_:
                pass
        violate("a path given as an object of an unsupported type (use str or pathlib.Path)")

    def real(path):
        """Like os.path.realpath for an absolute path, with the primitives bound above."""
        parts = path.split("/")
        parts.reverse()
        out, links = "", 0
        while parts:
            part = parts.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                out = out.rpartition("/")[0]
                continue
            candidate = out + "/" + part
            try:
                mode = lstat(candidate).st_mode
            except (OSError_, ValueError_):
                out = candidate
                continue
            if S_ISLNK(mode):
                links += 1
                if links > 40:
                    return ""
                target = readlink(candidate)
                if target.startswith("/"):
                    out = ""
                more = target.split("/")
                more.reverse()
                parts.extend(more)
                continue
            out = candidate
        return out or "/"

    def resolve(text, dir_fd=-1):
        if not text.startswith("/"):
            base = getcwd() if dir_fd is None or dir_fd < 0 else readlink("/proc/self/fd/%d" % dir_fd)
            if not base.startswith("/"):
                return ""
            text = base + "/" + text
        return real(text)

    def shown(text):
        return repr_(text if len_(text) <= 200 else text[:200] + "...")

    def check_write(path, what, dir_fd=-1, may_be_work=False):
        text = as_text(path)
        if text is None:
            return None
        resolved = resolve(text, dir_fd)
        if not (resolved.startswith(work_prefix) or (may_be_work and resolved == work)):
            violate(f"{what} {shown(text)} (outside the sandbox directory) is not allowed")
        return resolved

    def check_read(path, what):
        text = as_text(path)
        if text is None:
            return None
        resolved = resolve(text)
        if not (resolved in read_roots or resolved.startswith(read_prefixes)) or \
                (resolved + "/").startswith(hidden_prefixes):
            violate(f"{what} {shown(text)} (outside the sandbox directory and the Python standard "
                    "library) is not allowed")
        return resolved

    def count_created(resolved):
        if resolved not in created:
            created.add(resolved)
            if len_(created) > max_files:
                violate(f"creating more than {max_files} files or directories is not allowed")

    def read_whole(path):
        fd = p_open(path, O_RDONLY | O_CLOEXEC)
        try:
            chunks = []
            while True:
                chunk = p_read(fd, 1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        finally:
            p_close(fd)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (flags & write_flags) if type_(flags) is int_t else \
                (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if writing:
                # opening the directory itself for writing only works with O_TMPFILE (an unnamed
                # file in it); tempfile's NamedTemporaryFile also passes it to io.open with an opener
                resolved = check_write(path, "writing", may_be_work=True)
                if resolved is not None and type_(flags) is int_t and flags & O_CREAT:
                    count_created(resolved)
                return
            resolved = check_read(path, "reading")
            if resolved is None:
                return
            if resolved.startswith(work_prefix) or resolved == work:
                return
            try:
                is_dir = S_ISDIR(stat(resolved).st_mode)
            except (OSError_, ValueError_):
                is_dir = False
            if is_dir:  # a directory fd outside would let *at() calls with relative paths escape
                violate(f"opening the directory {shown(resolved)} (outside the sandbox directory) is not allowed")
            last_pyc[0] = resolved if resolved.endswith(".pyc") else None
            return
        if event == "import":
            name = str_copy(args[0]) if issubclass_(type_(args[0]), str_t) else ""
            if name in blocked_modules or name.startswith(blocked_prefixes):
                violate(f"importing {name} is not allowed")
            if args[1] is not None:  # an extension module is being loaded from args[1]
                text = as_text(args[1])
                resolved = resolve(text) if text is not None else ""
                if not resolved.startswith(native_prefixes) or (resolved + "/").startswith(hidden_prefixes):
                    violate(f"loading native code from {shown(text or '?')} is not allowed")
                # the file decides which module it is, whatever name it is loaded under
                loaded = resolved.rpartition("/")[2].partition(".")[0]
                if loaded in blocked_modules or loaded.startswith(blocked_prefixes):
                    violate(f"importing {loaded} (as {shown(name)}) is not allowed")
            return
        if event == "code.__new__":  # crafted bytecode can corrupt memory and so bypass this hook
            if getframe(1).f_code is coroutine_code:
                return
            violate("creating code objects (code.__new__, code.replace) is not allowed")
        if event == "marshal.loads":
            data = memoryview_(args[0]).tobytes()
            pyc, last_pyc[0] = last_pyc[0], None
            if pyc is not None:
                try:
                    same = read_whole(pyc)[16:] == data  # exactly a standard-library .pyc: trusted
                except OSError_:
                    same = False
                last_pyc[0] = None  # reading it went through this hook again
                if same:
                    return
            violate("marshal.loads() of data that is not a standard-library .pyc (crafted bytecode) is not allowed")
        if event in read_events:
            path = args[0] if args else None
            check_read("." if path is None else path, "listing")
            return
        if event == "os.chdir":
            # the working directory stays the sandbox directory: relative paths in events are then
            # resolved from the same place the kernel resolves them from (see the dir-fd note above)
            text = as_text(args[0])
            if text is None or resolve(text) != work:
                violate("changing the working directory is not allowed")
            return
        spec = write_events.get(event)
        if spec is not None:
            for path_index, dir_fd_index in spec:
                dir_fd = args[dir_fd_index] if dir_fd_index is not None else -1
                resolved = check_write(args[path_index], "changing", dir_fd if type_(dir_fd) is int_t else -1)
                if event == "os.mkdir" and resolved is not None:
                    count_created(resolved)
            return
        what = refused_events.get(event)
        if what is not None:
            violate(f"{what} ({event}) is not allowed")
        if event == "socket.__new__" and args[1] == 1:  # AF_UNIX: asyncio's socketpair; no connect/bind
            return
        if event == "fcntl.fcntl":
            if args[1] in signal_fcntls:
                violate(f"sending signals to processes (fcntl command {args[1]}: F_SETOWN / F_SETSIG) is not allowed")
            return
        if event == "fcntl.ioctl":
            if type_(args[1]) is int_t and (args[1] & 0xFFFFFFFF) in signal_ioctls:
                violate(f"ioctl request {args[1]:#x} (a file's signal owner, or its inode flags) is not allowed")
            return
        if event == "resource.prlimit":
            if args[2] is not None:
                violate("changing resource limits (resource.prlimit) is not allowed")
            return
        if event == "sqlite3.connect":
            text = as_text(args[0])
            if text is not None and text not in ("", ":memory:"):
                if text.startswith("file:"):
                    violate("sqlite3 URIs are not allowed")
                check_write(text, "opening the database")
            return
        for prefix, what in refused_prefixes:
            if event.startswith(prefix):
                violate(f"{what} ({event}) is not allowed")

    return hook, violate


def _packages_dirs(roots):
    """The site-packages / dist-packages directories inside the standard library's trees (a
    base interpreter's or a system Python's installed packages), each with a trailing slash."""
    import os
    out = []
    for root in roots:
        for name in ("site-packages", "dist-packages"):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                out.append(os.path.realpath(path) + "/")
    return out


def _load_builtins():
    """Import every builtin module the code may ask for (not the blocked ones) while nothing is
    refused yet, so that _imp.create_builtin can be removed; unload blocked modules something
    loaded, so that importing them raises the import event."""
    for name in sys.builtin_module_names:
        if name not in BLOCKED_MODULES and not name.startswith(BLOCKED_PREFIXES):
            try:
                __import__(name)
            except ImportError:
                pass
    for name in BLOCKED_MODULES - KEPT_MODULES:
        sys.modules.pop(name, None)


def _remove_functions(violate):
    """Replace REMOVED_FUNCTIONS by stubs that report a violation."""
    def stub(module_name, name):
        def refused(*args, **kwargs):
            violate(f"{module_name}.{name}() is not allowed")
        refused.__name__ = name
        return refused

    for module_name, names in REMOVED_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name in names:
            if hasattr(module, name):
                setattr(module, name, stub(module_name, name))


# --- running the code ------------------------------------------------------------------------

def _scrub(text, replacements):
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def main():
    import builtins
    import json
    import os
    import signal
    from errno import ENOMEM

    cfg = json.loads(sys.argv[1])
    report = _make_reporter(cfg["verdict_fd"])
    exit_ = os._exit
    work = cfg["work"]
    try:
        with open(cfg["code_path"], encoding="utf-8", errors="surrogatepass") as f:
            source = f.read()
        os.chdir(work)
        read_roots = [work]
        for entry in sys.path:  # the standard library only (-I -S: no site-packages, no script dir)
            if entry and os.path.exists(entry):
                read_roots.append(os.path.realpath(entry))
        _set_rlimits(cfg)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file is an OSError, not a kill

        def on_cpu_limit(signum, frame):
            report("cpu", f"CPU time limit of {cfg['cpu_s']} s exceeded")
            exit_(EXIT_CPU)
        signal.signal(signal.SIGXCPU, on_cpu_limit)
        hidden = _packages_dirs(read_roots)  # site-packages inside the stdlib's tree: hidden from the code
        layers = _apply_kernel_layers(cfg, read_roots, hidden)
        try:
            __import__("_posixsubprocess")  # loaded now to be defused: see BLOCKED_MODULES
        except ImportError:
            pass
        import gc
        import linecache
        import traceback
        gc.collect()  # drop what is left of ctypes
        # tracebacks the code prints may show the hook's frames: never read this file for them
        linecache.cache[__file__] = (0, None, [], __file__)
        if cfg["audit_hook"]:
            _load_builtins()
            hook, violate = _make_audit_hook(work, read_roots, hidden, report, cfg["max_files"])
            sys.addaudithook(hook)
            _remove_functions(violate)
            del hook, violate
            layers.append("audit-hook")
    except BaseException as e:  # the sandbox could not be set up: nothing of the code has run
        report("setup", f"{type(e).__name__}: {e}")
        exit_(EXIT_SETUP)
    report("start", " ".join(layers))

    scrub = [(root + "/", "<stdlib>/") for root in sorted(read_roots[1:], key=len, reverse=True)]
    scrub.insert(0, (work + "/", ""))
    sys.argv = [CODE_FILENAME]
    main_module = type(sys)("__main__")
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_module
    linecache.cache[CODE_FILENAME] = (len(source), None, source.splitlines(True), CODE_FILENAME)
    reserve = bytearray(1 << 20)  # freed on MemoryError, so that reporting has room
    status = 0
    try:
        code = compile(source, CODE_FILENAME, "exec")
        del source
        exec(code, main_module.__dict__)
    except SandboxViolation:
        status = EXIT_VIOLATION  # reported by the hook already
    except MemoryError:
        reserve = None
        main_module.__dict__.clear()
        report("memory", f"memory limit of {cfg['memory_bytes'] >> 20} MB exceeded (MemoryError)")
        status = EXIT_MEMORY
    except SystemExit as e:
        if e.code not in (None, 0):
            report("exception", f"SystemExit: {e.code}")
            status = EXIT_EXCEPTION
    except BaseException as e:
        if isinstance(e, OSError) and e.errno == ENOMEM:  # e.g. mmap past RLIMIT_AS: not a MemoryError
            reserve = None
            main_module.__dict__.clear()
            report("memory", f"memory limit of {cfg['memory_bytes'] >> 20} MB exceeded (ENOMEM)")
            status = EXIT_MEMORY
        else:
            summary = type(e).__name__
            try:  # the code may have broken traceback or sys.stderr: then only the summary is reported
                tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # skip this frame
                lines = traceback.format_exception(type(e), e, tb, limit=-10)
                summary = _scrub(lines[-1].strip(), scrub)
                sys.stderr.write(_scrub("".join(lines), scrub))
                sys.stderr.flush()
            except BaseException:
                pass
            report("exception", summary[:500])
            status = EXIT_EXCEPTION
    del reserve
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if status == 0:
        report("done")
    exit_(status)  # skips atexit handlers and non-daemon threads of the code


if __name__ == "__main__":
    main()
