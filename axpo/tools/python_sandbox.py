"""The `python` tool: run model-written Python code in a sandboxed child process.

Call: {"name": "python", "arguments": {"code": "print(6 * 7)"}} -> the text the code printed
(stdout and stderr together, in order), or an error (see axpo.tools.ERROR_KINDS).

Design: layers, each enough for some threats and together covering each other's gaps.

1. A separate process: `python -I -S -B -u` (isolated mode: no site-packages, no user or PYTHON*
   environment, no script directory on sys.path), a clean environment, stdin from /dev/null, in a
   new session (its own process group), in a throw-away working directory that is deleted after
   the run. Standard library only.
2. rlimits, set by the child before the code runs: address space (memory_mb; MemoryError ->
   "memory_limit"), CPU seconds (SIGXCPU, then SIGKILL a second later -> "timeout"), file size
   (max_file_mb; writes past it fail), open files, processes (ignored for root: fork is refused by
   layers 6 and 7), no core dumps.
3. A wall clock: past timeout_s the whole process group is killed with SIGKILL -> "timeout".
   Output is read incrementally and only its first and last max_output_chars are kept, so a flood
   cannot fill the host's memory; the pipes are drained until the process ends.
4. No network, no shared IPC: the child runs under `unshare --user --map-root-user --net --ipc`
   (falling back to `unshare --net --ipc`, then without --ipc), a new network namespace with no
   interfaces and, where allowed, its own System V IPC namespace, when available (probed once).
5. Landlock (Linux >= 5.13, when enabled): reading is limited to the sandbox directory, the
   standard library (without any site-packages / dist-packages inside its tree) and the
   shared-library directories (read-only, for extension modules; outside the system's library
   trees only the library files themselves), writing to the sandbox directory; no execve; TCP
   bind/connect refused (ABI >= 4); signals to and abstract sockets of processes outside the
   sandbox refused (ABI >= 6).
6. seccomp (x86_64, aarch64): no fork/vfork/execve, clone only for threads, no sockets but AF_UNIX
   socketpairs, no connect/bind/sendmsg, no ptrace/process_vm_*/pidfd_*, no kill, tgkill,
   rt_sigqueueinfo or rt_tgsigqueueinfo but to itself, no fcntl F_SETOWN / F_SETOWN_EX / F_SETSIG
   and no ioctl FIOSETOWN / SIOCSPGRP / TIOCSPGRP (the kernel would signal the file's owner, any
   process: this is what holds where Landlock has no signal scoping), no System V IPC (shm, sem,
   msg: segments outlive a process), no raising of rlimits, no file-metadata changes (chmod,
   chown, utime, xattr, inode-flag ioctls: Landlock does not cover them), no
   mount/namespace/clock/module/keyring/io_uring/bpf syscalls.
7. An audit hook (sys.addaudithook) in the child: refuses file access outside the sandbox
   directory (writes) or it plus the standard library (reads; site-packages inside the standard
   library's tree excluded), file-metadata changes, links, changing the working directory,
   sockets, process creation and signals (fcntl / ioctl file owners included), ctypes and other
   native-code imports (an extension loads only from the standard library's lib-dynload, and is
   recognised by its file, so a blocked module loaded under another name is still refused),
   sqlite3 (its ATTACH and connect open files in C, unaudited) and the account-database modules
   (spwd, pwd, grp), sub-interpreters, tracing, code-object creation and unmarshalling anything
   but standard-library .pyc files. `_imp.create_builtin` is removed (it rebuilds a builtin from
   its first initialisation, undefused): every builtin module is imported before the code runs.
   A refusal raises SandboxViolation (a BaseException) in the code
   and is reported on a private pipe -> "sandbox_violation" (even if the code catches it), with a
   message saying what was refused. Layers 5-6 are the boundary; the hook is what turns a refusal
   into a clear verdict instead of an EPERM, and the only file guard where Landlock is missing.

Known limits (the threat model):
- The target is a policy model's naive or accidental misuse, not a determined attacker. Audit hooks
  are not a security boundary (PEP 578): code that corrupts the interpreter's memory, or that
  reaches ctypes' leftover types (ctypes is loaded briefly to install layers 5-6) can get past the
  hook. Layers 1-6 are kernel-enforced and still hold then. Where Landlock is unavailable (old
  kernels, some containers), file access relies on the hook alone; a warning is logged once.
  Run the trainer as an unprivileged user (or in a container) for defence in depth: as root, a
  hook bypass without Landlock/seccomp could still act with root's rights.
- The verdict pipe is in the code's own process: code can write fake verdict lines or exit early.
  That only changes the error kind reported back to the same model; nothing on the host trusts it.
- Disk: each file is at most max_file_mb and the hook refuses more than max_files new files, but
  only the hook counts files; point tmp_dir at a size-limited tmpfs for a hard cap.
- Reading metadata is not refused (os.stat of any path works); timezone files are not readable, so
  local time is UTC; modules that need unreadable files (e.g. zoneinfo) fail with an error.
  Changing metadata is refused even inside the sandbox directory, so shutil.copy (which copies the
  mode) fails where shutil.copyfile works.
- Socket connects to 127.0.0.1 are refused by the hook ("sandbox_violation"); were it bypassed, the
  empty network namespace makes them fail with ENETUNREACH and seccomp with EPERM.
- Which layer setups hold what (tests/tools/test_python_sandbox.py runs each finding in each):
  everything on; Landlock off (what a kernel without it, or without signal scoping before 6.12,
  amounts to): the hook and seccomp refuse signals, native code, IPC and files; the hook alone
  (no kernel layers): everything above with a clear verdict, but nothing holds once the hook is
  bypassed; the kernel layers alone: files, processes, signals, sockets and IPC hold, with
  EPERM / EACCES instead of verdicts; seccomp alone: processes, signals, sockets, IPC and file
  metadata hold, file reads do not (no Landlock, no hook). On an architecture without a seccomp
  table, or without Landlock, a warning says once which guard is left.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from . import _sandbox_child as child
from .registry import Tool, ToolResult

__all__ = ["PythonSandbox", "SandboxRun", "python_tool", "network_namespace_prefix"]

_log = logging.getLogger(__name__)
_CHILD_PATH = os.path.abspath(child.__file__)
_VERDICT_CAP = 64 * 1024  # bytes of verdict lines kept (the code can write to the pipe too)
# with an IPC namespace too where the kernel allows (System V segments then die with the run)
_NAMESPACE_CANDIDATES = (["--user", "--map-root-user", "--net", "--ipc"], ["--net", "--ipc"],
                         ["--user", "--map-root-user", "--net"], ["--net"])
_namespace_cache: dict[str, list[str]] = {}
_namespace_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def network_namespace_prefix(python: str | None = None) -> list[str]:
    """The command prefix that runs `python` in a new network namespace with no interfaces.

    Probes `unshare --user --map-root-user --net`, then `unshare --net`, once per interpreter
    path; returns [] when neither works (no unshare, no permission, seccomp'd container).
    """
    python = python or sys.executable
    with _namespace_lock:
        if python not in _namespace_cache:
            prefix: list[str] = []
            unshare = shutil.which("unshare") or next(
                (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)
            for flags in _NAMESPACE_CANDIDATES if unshare else ():
                try:
                    probe = subprocess.run([unshare, *flags, python, "-I", "-S", "-c", "pass"],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, timeout=30, env={"PATH": "/usr/bin:/bin"})
                except (OSError, subprocess.SubprocessError):
                    continue
                if probe.returncode == 0:
                    prefix = [unshare, *flags]
                    break
            _namespace_cache[python] = prefix
        return list(_namespace_cache[python])


class _CappedOutput:
    """Keeps the first and the last `cap` bytes of a stream, and counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.cap:
                del self.tail[:len(self.tail) - self.cap]

    def text(self, max_chars: int) -> str:
        """The stream as text; past max_chars, its first and last halves around a marker."""
        if self.total == len(self.head) + len(self.tail):  # nothing dropped
            head = tail = (self.head + self.tail).decode("utf-8", "replace")
            if len(head) <= max_chars:
                return head
        else:
            head = self.head.decode("utf-8", "replace")
            tail = self.tail.decode("utf-8", "replace").lstrip("\ufffd")  # it may start mid-character
        first, last = max_chars // 2, max_chars - max_chars // 2
        return (f"{head[:first]}\n...[output truncated: {self.total} bytes in total; showing the first "
                f"{first} and the last {last} characters]...\n{tail[-last:]}")


@dataclass
class SandboxRun:
    """Everything about one run (PythonSandbox.execute); `result` is what the model sees."""
    result: ToolResult
    output: str = ""
    returncode: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    timed_out: bool = False
    layers: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    work_dir: str = ""


def _positive(value, name: str, integer: bool = False):
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")
    return value


class PythonSandbox:
    """Runs untrusted Python code in a sandboxed child process (see the module docstring).

    timeout_s: wall-clock limit of a run, start-up included (default 5.0).
    cpu_s: CPU-time limit, whole seconds (default 5).
    memory_mb: address-space limit (default 256).
    max_output_chars: output kept: the first and last halves of it, with a marker (default 2000).
    max_file_mb: largest file the code may write (default 8).
    max_files: files and directories the code may create (default 64).
    max_open_files: open file descriptors (default 64).
    max_processes: RLIMIT_NPROC (default 64; ignored for root; counts all of the user's processes).
    max_code_chars: longest code accepted (default 20000).
    network_namespace: run under `unshare` for an empty network namespace: None (default) = when
        available, True = required (RuntimeError here if unavailable), False = never.
    landlock, seccomp: apply these kernel layers when the kernel has them (default True).
    audit_hook: install the audit hook (default True). False is for testing the other layers
        alone: never run model code without it.
    tmp_dir: where the throw-away directories are made (default: tempfile's; a size-limited
        tmpfs gives a hard disk cap).
    python: the interpreter (default sys.executable).
    """

    def __init__(self, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 256,
                 max_output_chars: int = 2000, max_file_mb: int = 8, max_files: int = 64,
                 max_open_files: int = 64, max_processes: int = 64, max_code_chars: int = 20000,
                 network_namespace: bool | None = None, landlock: bool = True, seccomp: bool = True,
                 audit_hook: bool = True, tmp_dir: str | None = None, python: str | None = None):
        self.timeout_s = float(_positive(timeout_s, "timeout_s"))
        self.cpu_s = math.ceil(_positive(cpu_s, "cpu_s"))
        self.memory_mb = _positive(memory_mb, "memory_mb", integer=True)
        if self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32 (the interpreter itself needs ~20 MB), got {memory_mb}")
        self.max_output_chars = _positive(max_output_chars, "max_output_chars", integer=True)
        self.max_file_mb = _positive(max_file_mb, "max_file_mb", integer=True)
        self.max_files = _positive(max_files, "max_files", integer=True)
        self.max_open_files = _positive(max_open_files, "max_open_files", integer=True)
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files must be >= 16, got {max_open_files}")
        self.max_processes = _positive(max_processes, "max_processes", integer=True)
        self.max_code_chars = _positive(max_code_chars, "max_code_chars", integer=True)
        if network_namespace not in (None, True, False):
            raise ValueError(f"network_namespace must be None, True or False, got {network_namespace!r}")
        self.landlock, self.seccomp, self.audit_hook = bool(landlock), bool(seccomp), bool(audit_hook)
        if tmp_dir is not None and not os.path.isdir(tmp_dir):
            raise ValueError(f"tmp_dir must be an existing directory, got {tmp_dir!r}")
        self.tmp_dir = tmp_dir
        self.python = python or sys.executable
        if not self.python or not os.access(self.python, os.X_OK):
            raise ValueError(f"python must be an executable interpreter, got {self.python!r}")
        self.network_namespace = network_namespace
        if network_namespace is True and not network_namespace_prefix(self.python):
            raise RuntimeError("network_namespace=True, but `unshare --net` does not work here")

    # -- the tool --------------------------------------------------------------------------------

    def schema(self) -> dict:
        return {
            "type": "object",
            "properties": {"code": {
                "type": "string", "minLength": 1, "maxLength": self.max_code_chars,
                "description": "Python 3 source code to run; print() what you want to see."}},
            "required": ["code"],
            "additionalProperties": False,
        }

    def tool(self) -> Tool:
        """This sandbox as a registry Tool named "python"."""
        description = (f"Run Python 3 code and return what it prints (stdout and stderr). Standard "
                       f"library only; no network; files only in the working directory; limits: "
                       f"{self.timeout_s:g} s, {self.memory_mb} MB memory.")
        return Tool("python", lambda context, code: self.run(code), self.schema(), description)

    def run(self, code: str) -> ToolResult:
        """Run `code`; the ToolResult for the model (never raises on bad code)."""
        return self.execute(code).result

    # -- running ---------------------------------------------------------------------------------

    def _prefix(self) -> list[str]:
        if self.network_namespace is False:
            return []
        prefix = network_namespace_prefix(self.python)
        if not prefix:
            _warn_once("netns", "python sandbox: `unshare --net` is unavailable here; the code runs in "
                       "the host's network namespace (sockets are still refused by seccomp and the "
                       "audit hook)")
        return prefix

    def execute(self, code: str) -> SandboxRun:
        """Run `code` and return the details of the run (its `result` is what the model sees)."""
        if not isinstance(code, str):
            return SandboxRun(ToolResult.failure("bad_arguments", f"code must be a string, got {type(code).__name__}"))
        if len(code) > self.max_code_chars:
            return SandboxRun(ToolResult.failure(
                "bad_arguments", f"the code is {len(code)} characters long; the limit is {self.max_code_chars}"))
        try:
            root = tempfile.mkdtemp(prefix="axpo-py-", dir=self.tmp_dir)
        except OSError as e:  # e.g. a full disk: the host's trouble, reported rather than raised
            return SandboxRun(ToolResult.failure("crashed", f"the sandbox could not start ({e.strerror})"))
        try:
            return self._execute_in(root, code)
        except OSError as e:
            return SandboxRun(ToolResult.failure("crashed", f"the sandbox could not start ({e.strerror})"))
        finally:
            _remove_tree(root)

    def _execute_in(self, root: str, code: str) -> SandboxRun:
        root = os.path.realpath(root)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        code_path = os.path.join(root, "code.py")
        with open(code_path, "wb") as f:
            f.write(code.encode("utf-8", "surrogatepass"))
        verdict_r, verdict_w = os.pipe()
        config = {
            "verdict_fd": verdict_w, "code_path": code_path, "work": work,
            "memory_bytes": self.memory_mb << 20, "cpu_s": self.cpu_s, "file_bytes": self.max_file_mb << 20,
            "max_open_files": self.max_open_files, "max_processes": self.max_processes,
            "max_files": self.max_files, "landlock": self.landlock, "seccomp": self.seccomp,
            "audit_hook": self.audit_hook,
        }
        prefix = self._prefix()
        command = prefix + [self.python, "-I", "-S", "-B", "-u", "-X", "utf8", _CHILD_PATH,
                                    json.dumps(config)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work}
        started = time.monotonic()
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, cwd=work, env=env, close_fds=True,
                                       pass_fds=(verdict_w,), start_new_session=True, bufsize=0)
        except OSError as e:
            os.close(verdict_r)
            return SandboxRun(ToolResult.failure("crashed", f"the sandbox could not start ({e.strerror})"),
                              work_dir=work)
        finally:
            os.close(verdict_w)
        output = _CappedOutput(4 * self.max_output_chars)  # up to 4 bytes per character
        verdict = _CappedOutput(_VERDICT_CAP)
        try:
            timed_out, status, cpu_s = self._supervise(process, verdict_r, output, verdict, started)
        finally:
            os.close(verdict_r)
            process.stdout.close()
        wall_s = time.monotonic() - started
        verdicts = _parse_verdicts(bytes(verdict.head))
        text = output.text(self.max_output_chars)
        layers = (["netns"] if prefix else []) + (["ipcns"] if "--ipc" in prefix else []) + next((m.split() for k, m in verdicts if k == "start"), [])
        run = SandboxRun(result=ToolResult(text=""), output=text, returncode=status, wall_s=wall_s,
                         cpu_s=cpu_s, timed_out=timed_out, layers=layers, verdicts=verdicts, work_dir=work)
        run.result = self._classify(run)
        if any(kind == "start" for kind, _ in verdicts):
            self._warn_missing_layers(layers)
        return run

    def _supervise(self, process: subprocess.Popen, verdict_fd: int, output: _CappedOutput,
                   verdict: _CappedOutput, started: float):
        """Read both pipes until the process ends or the wall clock runs out; then kill the group
        and reap. Returns (timed_out, exit code (negative: signal; None if lost), CPU seconds)."""
        pid = process.pid
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None  # no pidfd (old kernel): poll with waitid
        sel = selectors.DefaultSelector()
        sel.register(process.stdout.fileno(), selectors.EVENT_READ, output)
        sel.register(verdict_fd, selectors.EVENT_READ, verdict)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, None)
        deadline = started + self.timeout_s
        exited = timed_out = False
        reaped = False
        try:
            while not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.02)):
                    if key.data is None:
                        exited = True
                    else:
                        _read_into(sel, key)
                if pidfd is None and not exited:
                    exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            # The leader has exited but is not reaped yet (so its pid, the group's id, cannot be
            # reused), or it is still running: kill the whole group, then drain the pipes.
            _kill_group(pid)
            if pidfd is not None:
                sel.unregister(pidfd)
            drain_until = time.monotonic() + 2.0
            while sel.get_map() and time.monotonic() < drain_until:
                for key, _ in sel.select(max(0.0, drain_until - time.monotonic())):
                    _read_into(sel, key)
            try:
                _, wait_status, usage = os.wait4(pid, 0)
            except ChildProcessError:  # reaped by someone else (e.g. a SIGCHLD handler of the host)
                reaped = True
                return timed_out, None, 0.0
            reaped = True
            process.returncode = os.waitstatus_to_exitcode(wait_status)
            return timed_out, process.returncode, usage.ru_utime + usage.ru_stime
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            if not reaped:  # interrupted (e.g. KeyboardInterrupt): leave nothing running
                _kill_group(pid)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                process.returncode = process.returncode if process.returncode is not None else -signal.SIGKILL

    def _classify(self, run: SandboxRun) -> ToolResult:
        kinds = {}
        for kind, message in run.verdicts:
            kinds.setdefault(kind, message)
        status = run.returncode

        def failure(kind: str, message: str) -> ToolResult:
            result = ToolResult.failure(kind, message)
            if run.output:
                result.text += "\nOutput:\n" + run.output
            return result

        if "violation" in kinds or status == child.EXIT_VIOLATION:
            return failure("sandbox_violation", kinds.get("violation") or "the code tried a forbidden operation")
        if run.timed_out:
            return failure("timeout", f"the code did not finish within {self.timeout_s:g} s and was stopped")
        if "cpu" in kinds or status in (child.EXIT_CPU, -signal.SIGXCPU) or \
                (status == -signal.SIGKILL and run.cpu_s >= self.cpu_s - 0.05):
            return failure("timeout", f"the code used more than {self.cpu_s} s of CPU time and was stopped")
        if "memory" in kinds or status == child.EXIT_MEMORY:
            return failure("memory_limit", f"the code ran out of memory (limit {self.memory_mb} MB)")
        if "setup" in kinds or ("start" not in kinds and status != 0):
            detail = kinds.get("setup") or (run.output.strip().splitlines() or ["no output"])[-1][:300]
            return ToolResult.failure("crashed", f"the sandbox could not start ({detail})")
        if "exception" in kinds or status == child.EXIT_EXCEPTION:
            return failure("tool_exception", kinds.get("exception") or "the code raised an exception")
        if status is None:  # its exit status was lost: trust only a clean finish
            status = 0 if "done" in kinds else -signal.SIGKILL
        if status == 0:
            return ToolResult(text=run.output if run.output else "(no output; print() what you want to see)")
        if status < 0:
            # (ru_maxrss cannot tell an out-of-memory kill: it counts the forking host's pages too)
            name = signal.Signals(-status).name if -status in signal.valid_signals() else f"signal {-status}"
            return failure("crashed", f"the Python process was killed by {name}")
        return failure("tool_exception", f"the code exited with status {status}")

    def _warn_missing_layers(self, layers: list[str]) -> None:
        if self.landlock and not any(layer.startswith("landlock-abi") for layer in layers):
            _warn_once("landlock", "python sandbox: Landlock is unavailable; file access is guarded by the "
                       f"audit hook only ({' '.join(layers) or 'no kernel layers'})")
        if self.seccomp and "seccomp" not in layers:
            _warn_once("seccomp", "python sandbox: seccomp is unavailable; process creation, sockets, signals "
                       "to other processes and System V IPC are refused by the audit hook only "
                       f"({' '.join(layers) or 'no kernel layers'})")
        abi = next((int(layer[12:]) for layer in layers if layer.startswith("landlock-abi")), 0)
        if self.landlock and 1 <= abi < 6:
            _warn_once("landlock-scope", f"python sandbox: Landlock ABI {abi} has no signal scoping (Linux < 6.12); "
                       "signals to other processes are refused by seccomp and the audit hook")


def _read_into(sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    try:
        chunk = os.read(key.fd, 1 << 16)
    except OSError:
        chunk = b""
    if chunk:
        key.data.add(chunk)
    else:
        sel.unregister(key.fd)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse_verdicts(data: bytes) -> list[tuple[str, str]]:
    verdicts = []
    for line in data.decode("utf-8", "replace").split("\n"):
        kind, sep, message = line.partition("\t")
        if sep and kind:
            verdicts.append((kind, re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), message)))
    return verdicts


def _remove_tree(path: str) -> None:
    """Delete a sandbox's directory even if the code made parts of it unwritable."""
    def make_writable_and_retry(function, failed_path, _excinfo):
        try:
            os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, stat.S_IRWXU)
            function(failed_path)
        except OSError:
            pass
    shutil.rmtree(path, onerror=make_writable_and_retry)


def python_tool(**limits) -> Tool:
    """The python Tool; `limits` are PythonSandbox's keyword arguments."""
    return PythonSandbox(**limits).tool()
