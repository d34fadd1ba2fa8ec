"""The python sandbox: results, limits, refusals, and that the host is never touched.

Each refusal is checked with everything on (the audit hook reports "sandbox_violation"), and the
host-protection ones also with the hook off (the kernel layers alone must hold: Landlock, seccomp,
the network namespace) and with the hook alone (where the kernel layers are missing)."""
import json
import os
import sys
import threading
import time

import pytest

from axpo.tools import PythonSandbox, ToolRegistry, python_tool
from axpo.tools.python_sandbox import network_namespace_prefix

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

SANDBOX = PythonSandbox(timeout_s=3.0, cpu_s=3, memory_mb=128)
KERNEL_ONLY = PythonSandbox(timeout_s=3.0, cpu_s=3, memory_mb=128, audit_hook=False)
HOOK_ONLY = PythonSandbox(timeout_s=3.0, cpu_s=3, memory_mb=128, landlock=False, seccomp=False,
                          network_namespace=False)


def layers_of(sandbox):
    return sandbox.execute("pass").layers


def require(sandbox, *names):
    layers = " ".join(layers_of(sandbox))
    missing = [n for n in names if n not in layers]
    if missing:
        pytest.skip(f"this machine lacks {missing} (layers: {layers})")


def children_of_this_process():
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                kids.append(int(entry))
    return kids


# --- results -----------------------------------------------------------------------------------

def test_prints_are_returned():
    result = SANDBOX.run("x = 6 * 7\nprint('answer', x)\nimport sys; print('err', file=sys.stderr)")
    assert result.ok and result.error is None
    assert result.text == "answer 42\nerr\n"


def test_no_output_says_so():
    assert SANDBOX.run("x = 1").text.startswith("(no output")


def test_stdlib_works_and_files_inside_the_sandbox_work():
    code = ("import json, math, re, fractions, statistics, zlib, hashlib, tempfile, asyncio, threading\n"
            "from pathlib import Path\n"
            "Path('d/e').mkdir(parents=True); Path('d/e/f.txt').write_text('ok')\n"
            "with tempfile.NamedTemporaryFile('w', delete=False) as t: t.write('tmp')\n"
            "print(Path('d/e/f.txt').read_text(), open(t.name).read(), math.isqrt(17), fractions.Fraction(2, 6))\n"
            "async def f(): return 5\n"
            "print(asyncio.run(f()), statistics.mean([1, 2, 3]), zlib.crc32(b'x'),\n"
            "      hashlib.sha1(b'').hexdigest()[:4])\n")
    result = SANDBOX.run(code)
    assert result.ok, result.text
    assert result.text == "ok tmp 4 1/3\n5 2 2363233923 da39\n"


def test_exception_is_a_tool_exception_with_a_scrubbed_traceback():
    result = SANDBOX.run("import json\n\ndef parse(s):\n    return json.loads(s)\n\nparse('{')\n")
    assert result.error == "tool_exception"
    assert result.text.startswith("Error (tool_exception): json.decoder.JSONDecodeError: Expecting property name")
    assert 'File "<code>", line 6, in <module>' in result.text and "line 4, in parse" in result.text
    assert '"<stdlib>/json/decoder.py"' in result.text
    for host_path in (sys.prefix, sys.base_prefix, os.path.dirname(__file__), "_sandbox_child"):
        assert host_path not in result.text


@pytest.mark.parametrize("code, fragment", [
    ("def f(:\n  pass", "SyntaxError"),
    ("import sys; sys.exit(3)", "SystemExit: 3"),
    ("def f(n): return f(n + 1)\nf(0)", "RecursionError"),
    ("print(input())", "EOFError"),  # stdin is /dev/null
    ("print('\\ud800')", "UnicodeEncodeError"),
    ("\x00", "SyntaxError"),
    ("open('big', 'wb').write(b'x' * (9 << 20))", "File too large"),  # max_file_mb=8
])
def test_other_failures_are_tool_exceptions(code, fragment):
    result = SANDBOX.run(code)
    assert result.error == "tool_exception" and fragment in result.text, result.text


@pytest.mark.parametrize("code, signal_name", [("import os\nos.abort()", "SIGABRT"),
                                              ("import faulthandler\nfaulthandler._sigsegv()", "SIGSEGV")])
def test_killed_by_a_signal_is_crashed(code, signal_name):
    result = SANDBOX.run(code)
    assert result.error == "crashed" and signal_name in result.text, result.text


def test_missing_layers_are_logged_once(caplog, monkeypatch):
    import axpo.tools.python_sandbox as module
    monkeypatch.setattr(module, "_warned", set())
    with caplog.at_level("WARNING", logger=module.__name__):
        for _ in range(2):
            SANDBOX._warn_missing_layers(["netns", "no-landlock", "audit-hook"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "Landlock is unavailable" in messages[0] and "seccomp" in messages[1]


def test_exit_zero_is_fine():
    assert SANDBOX.run("import sys, os\nprint('a')\nsys.exit(0)").text == "a\n"
    assert SANDBOX.run("import os\nprint('b')\nos._exit(0)").text == "b\n"


def test_bad_code_argument():
    assert SANDBOX.run(3).error == "bad_arguments"
    assert PythonSandbox(max_code_chars=10).run("print('hello world')").error == "bad_arguments"


def test_through_the_registry():
    registry = ToolRegistry([python_tool(timeout_s=3.0)])
    result = registry.execute(json.dumps({"name": "python", "arguments": {"code": "print(2 ** 10)"}}))
    assert result.ok and result.text == "1024\n" and result.call.arguments == {"code": "print(2 ** 10)"}
    assert registry.execute('{"name": "python", "arguments": {"code": ""}}').error == "bad_arguments"
    assert registry.execute('{"name": "python", "arguments": {"cmd": "ls"}}').error == "bad_arguments"


# --- limits ------------------------------------------------------------------------------------

def test_infinite_loop_hits_the_wall_clock():
    sandbox = PythonSandbox(timeout_s=1.5, cpu_s=30)
    start = time.monotonic()
    run = sandbox.execute("print('started', flush=True)\nwhile True:\n    pass")
    assert run.result.error == "timeout" and "1.5 s" in run.result.text and run.timed_out
    assert "started" in run.result.text  # output so far is kept
    assert time.monotonic() - start < 1.5 + 1.0


def test_sleeping_hits_the_wall_clock():
    start = time.monotonic()
    assert PythonSandbox(timeout_s=1.0).run("import time; time.sleep(60)").error == "timeout"
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    # ignoring SIGXCPU does not help: the hard limit kills a second later
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
])
def test_cpu_limit(code):
    run = PythonSandbox(timeout_s=20, cpu_s=1).execute(code)
    assert run.result.error == "timeout" and "CPU time" in run.result.text and not run.timed_out
    assert run.wall_s < 10


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)",
                                  "import threading\nx = [bytearray(10**7) for _ in range(100)]",
                                  "import mmap\nmmap.mmap(-1, 10**10)"])  # ENOMEM, not MemoryError
def test_memory_limit(code):
    result = SANDBOX.run(code)
    assert result.error == "memory_limit" and "128 MB" in result.text, result.text


def test_output_is_truncated_head_and_tail():
    result = PythonSandbox(max_output_chars=300).run("print('a' * 10000)\nprint('END')")
    assert result.ok and len(result.text) < 300 + 200
    assert result.text.startswith("a" * 150) and result.text.endswith("a" * 100 + "\nEND\n")
    assert "output truncated: 10005 bytes in total" in result.text


def test_output_flood_cannot_fill_host_memory():
    sandbox = PythonSandbox(timeout_s=2.0, cpu_s=1, max_output_chars=1000)
    run = sandbox.execute("while True:\n    print('x' * 10**6)")
    assert run.result.error == "timeout"
    assert len(run.result.text) < 1000 + 300 and "output truncated" in run.result.text
    assert len(run.output) < 1300


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code, fragment", [
    ("import os\nwhile True:\n    os.fork()", "os.fork"),
    ("import subprocess\nsubprocess.run(['ls'])", "subprocess.Popen"),
    ("import os\nos.system('id')", "os.system"),
    ("import os\nos.execv('/bin/ls', ['ls'])", "os.exec"),
    ("import os\nos.kill(1, 0)", "os.kill"),
    ("import ctypes", "importing ctypes"),
    ("import importlib\nimportlib.import_module('ctypes')", "importing _ctypes"),
    ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))", "network access"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1/')", "network access"),
    ("open('/etc/passwd').read()", "reading '/etc/passwd'"),
    (f"open({__file__!r}).read()", "reading"),  # this repository
    ("import os\nos.listdir('/')", "listing '/'"),
    ("import sys\nsys.path.insert(0, '/work')\nimport axpo_not_here", "listing"),
    ("import os\nos.chdir('/')", "working directory"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "resource limits"),
    ("import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))", "marshal"),
    ("(lambda: 0).__code__.replace(co_code=b'')", "code objects"),
    ("import sys\nsys.settrace(lambda *a: None)", "tracing"),
    ("import signal, os\nsignal.pidfd_send_signal(os.pidfd_open(1), 0)", "pidfd_open"),
    ("[open(f'f{i}', 'w').close() for i in range(100)]", "more than 64 files"),
    # a caught refusal is still reported
    ("try:\n    import ctypes\nexcept BaseException:\n    pass\nprint('went on')", "importing ctypes"),
])
def test_violations(code, fragment):
    result = SANDBOX.run(code)
    assert result.error == "sandbox_violation", result.text
    assert result.text.startswith("Error (sandbox_violation): ") and fragment in result.text


@pytest.mark.parametrize("sandbox", [SANDBOX, KERNEL_ONLY, HOOK_ONLY], ids=["all", "kernel-only", "hook-only"])
def test_fork_bomb_leaves_no_process_behind(sandbox):
    if sandbox is KERNEL_ONLY:
        require(sandbox, "seccomp")  # without it, this would be a real fork bomb
    before = children_of_this_process()
    result = sandbox.run("import os\nwhile True:\n    os.fork()")
    if sandbox is KERNEL_ONLY:
        assert result.error == "tool_exception" and "Operation not permitted" in result.text, result.text
    else:
        assert result.error == "sandbox_violation" and "os.fork" in result.text, result.text
    assert children_of_this_process() == before


@pytest.mark.parametrize("sandbox", [SANDBOX, KERNEL_ONLY, HOOK_ONLY], ids=["all", "kernel-only", "hook-only"])
def test_host_files_are_never_touched(sandbox, tmp_path):
    if sandbox is KERNEL_ONLY:
        require(sandbox, "landlock", "seccomp")  # seccomp refuses the metadata changes
    target = tmp_path / "host.txt"
    target.write_text("original")
    os.chmod(target, 0o644)
    stat_before = os.stat(target)
    attempts = [
        f"open({str(target)!r}, 'w').write('pwned')",
        f"open({str(target)!r}, 'a').write('pwned')",
        f"import os\nos.remove({str(target)!r})",
        f"import os\nos.rename({str(target)!r}, 'stolen')",
        f"import os\nos.chmod({str(target)!r}, 0o777)",
        f"import os\nos.utime({str(target)!r}, (0, 0))",
        f"import os\nos.truncate({str(target)!r}, 0)",
        f"import os\nos.link({str(target)!r}, 'hard')\nopen('hard', 'w').write('pwned')",
        f"import os\nos.symlink({str(target)!r}, 'soft')\nopen('soft', 'w').write('pwned')",
        f"import shutil\nshutil.copy('/dev/null', {str(target)!r})",
        # relative to a directory fd, which the open event does not show
        f"import os\nfd = os.open('.', os.O_RDONLY)\n"
        f"os.open(os.path.relpath({str(target)!r}), os.O_WRONLY | os.O_TRUNC, dir_fd=fd)",
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('pwned')",
        f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})",
    ]
    for code in attempts:
        result = sandbox.run(code)
        assert not result.ok, (code, result.text)
        if sandbox is not KERNEL_ONLY:
            assert result.error == "sandbox_violation", (code, result.text)
    assert target.read_text() == "original"
    stat_after = os.stat(target)
    assert (stat_after.st_mode, stat_after.st_mtime_ns, stat_after.st_nlink) == \
        (stat_before.st_mode, stat_before.st_mtime_ns, stat_before.st_nlink)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.txt"]


def test_kernel_layers_alone_refuse_reads_processes_and_sockets():
    require(KERNEL_ONLY, "landlock", "seccomp")
    for code in ["open('/etc/passwd').read()", f"open({__file__!r}).read()", "import os\nos.listdir('/')"]:
        result = KERNEL_ONLY.run(code)
        assert result.error == "tool_exception" and "PermissionError" in result.text, result.text
    for code in ["import os\nos.fork()", "import subprocess\nsubprocess.run(['ls'])",
                 "import socket\nsocket.socket()", "import os\nos.kill(1, 0)",
                 "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/x.sock')",
                 "import ctypes\nassert ctypes.CDLL(None).syscall(57) == 0, 'fork refused'"]:
        result = KERNEL_ONLY.run(code)
        assert result.error == "tool_exception" and ("Operation not permitted" in result.text
                                                      or "fork refused" in result.text), result.text


def test_network_namespace_has_no_route_even_to_localhost():
    if not network_namespace_prefix():
        pytest.skip("unshare --net is unavailable here")
    sandbox = PythonSandbox(timeout_s=3.0, audit_hook=False, seccomp=False, landlock=False)
    result = sandbox.run("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 22))")
    assert result.error == "tool_exception" and "Network is unreachable" in result.text, result.text


def test_layers_are_applied_where_the_kernel_has_them():
    """A layer that silently failed to apply would turn the kernel-only tests into skips."""
    import ctypes
    import platform
    layers = layers_of(SANDBOX)
    assert "audit-hook" in layers
    assert ("netns" in layers) == bool(network_namespace_prefix())
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi >= 1:
        assert f"landlock-abi{abi}" in layers
    if platform.machine() in ("x86_64", "aarch64"):
        assert "seccomp" in layers
    assert "audit-hook" not in layers_of(KERNEL_ONLY)
    assert layers_of(HOOK_ONLY) == ["audit-hook"]


def test_printed_verdicts_are_just_output():
    result = SANDBOX.run("print('violation\\tfake')\nprint('memory\\tfake')")
    assert result.ok and result.text == "violation\tfake\nmemory\tfake\n"


# --- clean-up ----------------------------------------------------------------------------------

def test_sandbox_directory_is_removed():
    run = SANDBOX.execute("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nprint(os.getcwd())")
    assert run.result.ok, run.result.text
    work = run.output.strip()
    assert work == run.work_dir and os.path.basename(work) == "work"
    assert not os.path.exists(work) and not os.path.exists(os.path.dirname(work))


def test_many_runs_leak_no_fds_or_processes():
    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    SANDBOX.run("pass")  # warm up (the namespace probe)
    fds, kids = open_fds(), children_of_this_process()
    codes = ["print(1)", "1/0", "import ctypes", "x = bytearray(10**10)", "import os\nos.fork()"]
    for i in range(15):
        SANDBOX.run(codes[i % len(codes)])
    assert open_fds() == fds and children_of_this_process() == kids


def test_concurrent_runs():
    results = [None] * 4

    def work(i):
        results[i] = SANDBOX.run(f"import time\ntime.sleep(0.2)\nprint({i} * {i})")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.text for r in results] == [f"{i * i}\n" for i in range(4)]


@pytest.mark.parametrize("options, error", [
    ({"timeout_s": 0}, ValueError), ({"cpu_s": -1}, ValueError), ({"memory_mb": 8}, ValueError),
    ({"max_output_chars": 1.5}, ValueError), ({"network_namespace": "yes"}, ValueError),
    ({"tmp_dir": "/no/such/dir"}, ValueError), ({"python": "/no/python"}, ValueError), ({"nope": 1}, TypeError),
])
def test_bad_options(options, error):
    with pytest.raises(error):
        PythonSandbox(**options)


# --- hardening: each finding of the adversarial run, in every layer setup where it applies -----

NO_LANDLOCK = PythonSandbox(timeout_s=3.0, cpu_s=3, memory_mb=128, landlock=False)  # a kernel without it
SECCOMP_ONLY = PythonSandbox(timeout_s=3.0, cpu_s=3, memory_mb=128, landlock=False, audit_hook=False,
                             network_namespace=False)
WITH_HOOK = {"all": SANDBOX, "no-landlock": NO_LANDLOCK, "hook-only": HOOK_ONLY}
WITHOUT_HOOK = {"kernel-only": KERNEL_ONLY, "seccomp-only": SECCOMP_ONLY}
SETUPS = {**WITH_HOOK, **WITHOUT_HOOK}


@pytest.fixture
def victim():
    """A process outside the sandbox for the code to try to signal: (pid, is_alive)."""
    import subprocess
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid, lambda: proc.poll() is None
    proc.kill()
    proc.wait()


SIGNAL_ATTACKS = {
    # F_SETOWN + F_SETSIG + O_ASYNC: the kernel sends SIGKILL to the owner on the next write
    "fcntl": "import os, fcntl\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {pid})\nfcntl.fcntl(r, 10, 9)\n"
             "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')\nimport time\ntime.sleep(0.3)",
    # FIOSETOWN: the owner gets SIGIO (whose default action ends the process)
    "ioctl": "import os, fcntl, struct\nr, w = os.pipe()\nfcntl.ioctl(r, 0x8901, struct.pack('i', {pid}))\n"
             "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')\nimport time\ntime.sleep(0.3)",
}


def _needs_seccomp(sandbox):
    if sandbox in WITHOUT_HOOK.values():
        require(sandbox, "seccomp")


@pytest.mark.parametrize("attack", sorted(SIGNAL_ATTACKS))
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_code_cannot_signal_other_processes_through_file_owners(victim, setup, attack):
    sandbox = SETUPS[setup]
    _needs_seccomp(sandbox)
    pid, alive = victim
    result = sandbox.run(SIGNAL_ATTACKS[attack].format(pid=pid))
    assert not result.ok, result.text
    assert result.error == ("sandbox_violation" if setup in WITH_HOOK else "tool_exception"), result.text
    assert alive()


@pytest.mark.parametrize("setup", sorted(WITHOUT_HOOK))
def test_seccomp_refuses_queued_signals_to_other_processes(victim, setup):
    sandbox = SETUPS[setup]
    require(sandbox, "seccomp")
    pid, alive = victim
    nr = {"x86_64": (129, 297), "aarch64": (138, 240)}.get(os.uname().machine)
    if nr is None:
        pytest.skip("no syscall numbers for this architecture")
    # si_code SI_QUEUE (-1): what sigqueue(3) sends, which the kernel lets a process send to its user's others
    code = (f"import ctypes, os, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"info = ctypes.create_string_buffer(struct.pack('iii', 9, 0, -1) + bytes(116))\n"
            f"a = libc.syscall({nr[0]}, {pid}, 9, info)\nb = libc.syscall({nr[1]}, {pid}, {pid}, 9, info)\n"
            f"print(a, b, os.strerror(ctypes.get_errno()))")
    result = sandbox.run(code)
    assert result.ok and result.text.startswith("-1 -1 Operation not permitted"), result.text
    assert alive()


def _site_packages_extension():
    import glob
    base = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    found = sorted(f for f in glob.glob(os.path.join(base, "*.cpython-*.so"))
                   if os.path.basename(f).split(".")[0].isidentifier())
    if not found:
        pytest.skip(f"no extension module directly in {base}")
    return base, found[0]


@pytest.mark.parametrize("setup", sorted(WITH_HOOK))
def test_no_native_code_or_packages_from_the_base_interpreters_site_packages(setup):
    base, extension = _site_packages_extension()
    name = os.path.basename(extension).split(".")[0]
    for code in [f"import sys\nsys.path.append({base!r})\nimport {name}",
                 f"import importlib.util as u\nspec = u.spec_from_file_location({name!r}, {extension!r})\n"
                 f"u.module_from_spec(spec)",
                 f"open({os.path.join(base, os.listdir(base)[0])!r}, 'rb').read(1)"]:
        result = SETUPS[setup].run(code)
        assert result.error == "sandbox_violation", (code, result.text)


def test_landlock_hides_the_base_interpreters_site_packages():
    require(KERNEL_ONLY, "landlock")
    base, extension = _site_packages_extension()
    result = KERNEL_ONLY.run(f"open({extension!r}, 'rb').read(1)")
    assert result.error == "tool_exception" and "PermissionError" in result.text, result.text
    assert KERNEL_ONLY.run("import json, decimal, asyncio\nprint('ok')").text == "ok\n"  # the stdlib still reads


@pytest.mark.parametrize("setup", sorted(WITHOUT_HOOK) + ["namespace-only"])
def test_system_v_segments_do_not_outlive_the_run(setup):
    import random
    sandbox = SETUPS.get(setup) or PythonSandbox(timeout_s=3.0, audit_hook=False, seccomp=False, landlock=False)
    if setup == "namespace-only":
        require(sandbox, "ipcns")
    else:
        require(sandbox, "seccomp")
    key = random.randrange(1 << 20, 1 << 30)
    result = sandbox.run(f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 4096, 0o1600))")
    assert result.ok, result.text
    assert (result.text.strip() == "-1") == (setup != "namespace-only"), result.text  # seccomp refuses it
    with open("/proc/sysvipc/shm") as f:
        assert str(key) not in {line.split()[0] for line in f.readlines()[1:]}


@pytest.mark.parametrize("setup", sorted(WITH_HOOK))
def test_blocked_modules_do_not_load_under_another_name(setup, tmp_path):
    import glob
    import sysconfig
    dynload = os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload")
    found = glob.glob(os.path.join(dynload, "_posixsubprocess*.so"))
    outside = tmp_path / "pwned"
    attacks = [
        "import _imp, importlib.machinery as m\n"
        f"_imp.create_builtin(m.ModuleSpec('posix', None)).mknod({str(outside)!r})",
    ]
    if found:
        attacks.append(f"import importlib.util as u\nspec = u.spec_from_file_location('x._posixsubprocess', {found[0]!r})\n"
                       "m = u.module_from_spec(spec)\n"
                       f"m.fork_exec(['/bin/sh', '-c', 'touch {outside}; sleep 30'], [b'/bin/sh'], True, (), None, None, "
                       "-1, -1, -1, -1, -1, -1, -1, -1, True, True, None, None, None, -1, None, True)")
    before = children_of_this_process()
    for code in attacks:
        result = SETUPS[setup].run(code)
        assert result.error == "sandbox_violation", (code, result.text)
    assert not outside.exists() and children_of_this_process() == before


@pytest.mark.parametrize("setup", sorted(WITH_HOOK))
def test_c_level_file_access_without_audit_events_is_refused(setup, tmp_path):
    outside = tmp_path / "attached.db"
    for code, fragment in [
        (f"import sqlite3\nsqlite3.connect(':memory:').execute(\"ATTACH DATABASE '{outside}' AS x\")", "_sqlite3"),
        ("import sqlite3\n[sqlite3.connect(f'db{i}') for i in range(200)]", "_sqlite3"),
        ("import spwd\nprint(spwd.getspall())", "spwd"),
        ("import pwd\nprint(pwd.getpwall())", "pwd"),
        ("import grp\nprint(grp.getgrall())", "grp"),
    ]:
        result = SETUPS[setup].run(code)
        assert result.error == "sandbox_violation" and f"importing {fragment}" in result.text, (code, result.text)
    assert not outside.exists()


def test_landlock_keeps_the_shadow_file_from_spwd():
    require(KERNEL_ONLY, "landlock")
    result = KERNEL_ONLY.run("import warnings\nwarnings.simplefilter('ignore')\nimport spwd\ntry:\n"
                             "    print(len(spwd.getspall()))\nexcept OSError as e:\n    print(e)")
    assert result.ok and result.text.strip() in ("0", "[Errno 13] Permission denied"), result.text
