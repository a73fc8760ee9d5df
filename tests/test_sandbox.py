"""The sandbox for model-written code: ordinary programs run within their limits; every escape found against it is
held, by all its layers and with one missing; each layer reports truly whether it holds; and the code never runs
without the essential ones. The probes attack only what the tests make: a scratch directory anyone may write, a
bystander process, a unix socket and a TCP connection."""

import concurrent.futures
import ctypes.util
import errno
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanochat_flyte.evaluation.sandbox import (
    AUDIT_ARCH,
    CLONE_NEWUSER,
    LAYERS,
    PR_SET_SECCOMP,
    PRIVATE_ROOT,
    SANDBOX_UIDS,
    SYSCALLS,
    Limits,
    Rule,
    execute,
    is_mapped,
    probe_sandbox,
    sandbox_available,
    sandbox_rules,
    sandbox_uid,
    seccomp_program,
)

ROOT = Path(__file__).resolve().parents[1]
MACHINE = platform.machine()
pytestmark = pytest.mark.skipif(sys.platform != "linux" or MACHINE not in SYSCALLS,
                                reason="the sandbox needs Linux on x86_64 or aarch64")


def require_every_layer() -> None:
    """Skip, saying why, where this kernel or container lacks a layer (then taking one more away shows nothing)."""
    available, why = sandbox_available()
    assert available, why
    if probe_sandbox()[0] != LAYERS:
        pytest.skip(f"this kernel or container lacks a layer: {why}")


def test_the_sandbox_works_here_with_every_layer():
    require_every_layer()
    assert sandbox_available() == (True, " + ".join(LAYERS))


def test_a_passing_program_and_a_failing_assertion():
    passed = execute("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert passed.passed and passed.returncode == 0 and passed.stdout == "ok\n" and not passed.timed_out
    assert passed.isolation == probe_sandbox()[0]
    failed = execute("assert 1 + 1 == 3, 'arithmetic'")
    assert not failed.passed and failed.returncode == 1
    assert "AssertionError: arithmetic" in failed.stderr
    assert not execute("def broken(:\n    pass").passed  # a syntax error fails too


def test_what_humaneval_programs_use_still_works():
    result = execute(textwrap.dedent("""
        import collections, datetime, fractions, hashlib, heapq, math, random, re, string, threading, time
        print(math.comb(5, 2), hashlib.sha256(b"x").hexdigest()[:6], sorted(collections.Counter("aab").items()))
        print(time.strftime("%Z") != "", datetime.date(2024, 1, 1).isoformat(), fractions.Fraction(1, 3) * 3)
        thread = threading.Thread(target=print, args=("thread ran",))
        thread.start()
        thread.join()
        with open("scratch.txt", "w") as file:
            file.write("written")
        print(open("scratch.txt").read(), file=open("/dev/null", "w"))
    """))
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == ["10 2d7116 [('a', 2), ('b', 1)]", "True 2024-01-01 1", "thread ran"]


@pytest.mark.parametrize("code", ["x = '\ud800'", "print('\udcff')", "\x00", "'\ufffe' + \x7f"],
                         ids=["lone-surrogate", "escaped-byte-surrogate", "nul", "control-character"])
def test_any_string_gives_a_result(code):
    result = execute(code)  # lone surrogates, a NUL, a control character: the child's compile() refuses them
    assert not result.passed and result.returncode == 1 and "Error" in result.stderr


def test_an_infinite_loop_is_stopped_at_the_timeout():
    start = time.monotonic()
    result = execute("while True:\n    pass", Limits(timeout=1.0))
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.monotonic() - start < 30  # 1 s, the interpreter's start and the kill (slack for a loaded machine)


def test_memory_limit():
    result = execute("block = bytearray(1 << 30)", Limits(memory_bytes=256 * 2**20))
    assert not result.passed and "MemoryError" in result.stderr


def test_resource_limits_cannot_be_raised_again():
    result = execute("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert not result.passed and "ValueError" in result.stderr


def test_output_is_truncated_in_the_middle():
    result = execute("import sys\nprint('x' * 100_000)\nprint('y' * 100_000, file=sys.stderr)\nprint('the end')",
                     Limits(output_bytes=1000))
    assert result.passed and result.truncated
    assert result.stdout == "x" * (500 + 491) + "\nthe end\n"  # the first 500 bytes, and the last 500
    assert result.stderr == "y" * 999 + "\n"
    result = execute("print('x' * 999)", Limits(output_bytes=1000))  # 1,000 bytes with its line break: all kept
    assert not result.truncated and result.stdout == "x" * 999 + "\n"


def test_working_directory_is_empty_and_removed_and_stdin_and_environment_are_clean(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    result = execute(textwrap.dedent("""
        import os, sys
        print(os.getcwd())
        print(os.listdir("."))
        open("scratch.txt", "w").write("written")
        print(repr(sys.stdin.read()))
        print("SECRET_TOKEN" in os.environ)
    """))
    assert result.passed, result.stderr
    workdir, listing, stdin, leaked = result.stdout.splitlines()
    assert listing == "[]" and stdin == "''" and leaked == "False"
    assert Path(workdir).name.startswith("nanochat-sandbox-") and not Path(workdir).exists()


def test_destructive_functions_are_disabled():
    result = execute("import os, shutil\nprint(os.system, os.remove, shutil.rmtree)")
    assert result.passed and result.stdout == "None None None\n"

# ------------------------------------------------------------------------------------------ the escape probes


PRELUDE = """\
import ctypes, os, signal, socket
libc = ctypes.CDLL(None, use_errno=True)


def c(result):  # a libc call's -1 as the OSError Python would raise
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def attempt(name, action):
    try:
        action()
    except OSError as error:
        print(f"{name}: held, {error.strerror}")
    else:
        print(f"{name}: GOT THROUGH")
"""
PROBES = {  # each escape found against the sandbox: an action that must fail with OSError
    "read a secret": "open({secret!r}).read()",
    "overwrite a file": "open({secret!r}, 'w').write('overwritten')",
    "truncate a file": "c(libc.truncate({secret!r}.encode(), 0))",
    "delete a file": "c(libc.unlink({secret!r}.encode()))",
    "delete it from a shell": "os.execv('/bin/sh', ['sh', '-c', 'rm -f {secret}'])",
    "open a standard module for writing": "open(os.__file__, 'a').close()",  # appends nothing, should it open
    "write /dev/shm": "open('/dev/shm/{marker}', 'w').close()",
    # 8 MB in files of 0.5 MB: each is within PROBE_LIMITS.file_bytes, only the cap on the total can stop it
    "fill the disk": "[open(f'fill{{i}}', 'wb').write(bytes(2**19)) for i in range(16)]",
    "connect to a unix socket": "socket.socket(socket.AF_UNIX).connect({unix!r})",
    "connect over TCP": "socket.create_connection(('127.0.0.1', {port}), timeout=3)",
    "send over UDP": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))",
    "open a raw socket": "socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
    "open a packet socket": "socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
    "kill a bystander": "c(libc.kill({bystander}, signal.SIGKILL))",
    "signal the evaluator": "c(libc.kill(os.getppid(), 0))",  # 0: the permission check alone, should it pass
    "signal pid 1": "c(libc.kill(1, 0))",
    "make a pipe signal a bystander": "c(libc.fcntl(os.pipe()[0], 8, {bystander}))",  # F_SETOWN: SIGIO at each write
    "take the evaluator's socket": "c(libc.syscall({pidfd_getfd}, c(libc.syscall({pidfd_open}, os.getppid(), 0)), "
                                   "{connection}, 0))",
    "open /proc/sys for writing": "os.close(os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY))",
    "unshare a mount namespace": "c(libc.unshare(0x10000000 | 0x00020000))",  # CLONE_NEWUSER | CLONE_NEWNS
    "mount a tmpfs": "c(libc.mount(b'none', b'.', b'tmpfs', 0, None))",
    "fork": "c(libc.fork())",
    "reset the parent-death signal": "c(libc.prctl(1, 0, 0, 0, 0))",  # PR_SET_PDEATHSIG
    # PR_SET_DUMPABLE: a crash would then dump its memory, through a core_pattern helper that runs as root
    "make itself dumpable again": "c(libc.prctl(4, 1, 0, 0, 0))",
    "lower the priority of the uid's processes": "c(libc.setpriority(2, 0, 19))",  # PRIO_USER, who=0: all of them
    # each pipe's buffer is kernel memory outside the address-space limit: 200 of them (400 fds) must not open
    "hold kernel memory in pipes": "[os.pipe() for _ in range(200)]",
    "grow a pipe's buffer to 1 MiB": "c(libc.fcntl(os.pipe()[1], 1031, 1 << 20))",  # F_SETPIPE_SZ
    "read the session keyring": "c(libc.syscall({keyctl}, 0, -3, 0))",  # KEYCTL_GET_KEYRING_ID, the session's
}
PROBE_LIMITS = Limits(file_bytes=2**20, disk_bytes=4 * 2**20)
SECRET = "the-token-a-pod-mounts"


def probe_program(names, where: dict) -> str:
    return PRELUDE + "".join(f"attempt({name!r}, lambda: {PROBES[name].format(**where)})\n" for name in names)


@dataclass
class Host:
    """What the probes attack, and how to see that nothing happened to it."""
    scratch: Path
    unix: socket.socket  # listening
    tcp: socket.socket  # listening
    far: socket.socket  # the far end of a connection the evaluator (this process) holds
    bystander: subprocess.Popen
    where: dict  # the probes' targets, by name

    def assert_untouched(self) -> None:
        assert (self.scratch / "token").read_text() == SECRET
        assert not Path("/dev/shm", self.where["marker"]).exists()
        assert self.bystander.poll() is None
        for reached in (self.unix.accept, self.tcp.accept, lambda: self.far.recv(1)):
            with pytest.raises(BlockingIOError):  # no connection, no data
                reached()


@pytest.fixture
def host():
    scratch = Path(tempfile.mkdtemp(prefix="nanochat-scratch-"))
    scratch.chmod(0o777)  # open to everyone, as a careless mount is: only the sandbox stands in the way
    (scratch / "token").write_text(SECRET)
    (scratch / "token").chmod(0o666)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(scratch / "socket"))
    (scratch / "socket").chmod(0o777)
    unix.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    held = socket.create_connection(tcp.getsockname())  # the evaluator's connection to some service
    far, _ = tcp.accept()
    for sock in (unix, tcp, far):
        sock.setblocking(False)
    bystander = subprocess.Popen(["sleep", "60"])
    numbers = SYSCALLS[MACHINE]
    where = {"secret": str(scratch / "token"), "marker": scratch.name, "unix": str(scratch / "socket"),
             "port": tcp.getsockname()[1], "bystander": bystander.pid, "connection": held.fileno(),
             "pidfd_open": numbers["pidfd_open"], "pidfd_getfd": numbers["pidfd_getfd"], "keyctl": numbers["keyctl"]}
    yield Host(scratch, unix, tcp, far, bystander, where)
    bystander.kill()
    bystander.wait()
    for sock in (unix, tcp, held, far):
        sock.close()
    shutil.rmtree(scratch)


@pytest.mark.parametrize("probe", PROBES)
def test_each_escape_is_held(probe, host):
    if probe == "fill the disk" and PRIVATE_ROOT not in probe_sandbox()[0]:
        pytest.skip(f"no private root here, so no cap on the total a program writes: {sandbox_available()[1]}")
    result = execute(probe_program([probe], host.where), PROBE_LIMITS)
    assert result.stdout.startswith(f"{probe}: held, "), result.stdout + result.stderr
    host.assert_untouched()


# ------------------------------------------------------------------------------------------ missing layers


def run_evaluator(setup: str, code: str, python: str = sys.executable, launcher: tuple[str, ...] = ()) -> str:
    """code run by a fresh Python (the evaluator) after `setup`, which takes away what a kernel or container without
    some layer would not give; launcher: a command that starts it. Returns its stdout."""
    prelude = "import platform\nfrom nanochat_flyte.evaluation.sandbox import *\n"
    result = subprocess.run([*launcher, python, "-c", prelude + setup + textwrap.dedent(code)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refusing(*rules: Rule) -> str:
    """A setup: the evaluator's system calls (and so the sandbox's) go through a seccomp filter of these rules."""
    return f"install_filter(seccomp_program(platform.machine(), {list(rules)!r}))\n"


NO_LANDLOCK = refusing(Rule("landlock_create_ruleset", errno.ENOSYS))  # a kernel before 5.13, or without it
NO_NAMESPACES = refusing(Rule("unshare"))  # a container whose seccomp profile refuses unshare(2)
# root without CAP_SYS_ADMIN, as a pod runs by default: it becomes the code's uid, then makes a user namespace
USER_NAMESPACE = refusing(Rule("unshare", arg=0, mask=CLONE_NEWUSER, unless=(CLONE_NEWUSER,)))
AS_ANOTHER_USER = (USER_NAMESPACE, NO_NAMESPACES, NO_NAMESPACES + NO_LANDLOCK)  # root changes uid before it builds
# a root without CAP_SETGID (6) and CAP_SETUID (7), as some containers run: PR_CAPBSET_DROP (24) takes them from
# every program it starts
NO_SETUID = "libc.prctl(24, 6, 0, 0, 0)\nlibc.prctl(24, 7, 0, 0, 0)\n"
OTHERS_CAN_RUN = (f"import os, sys, tempfile; os.setresuid(*[{SANDBOX_UIDS[0]}] * 3); os.stat(os.__file__); "
                  "os.stat(tempfile.gettempdir()); print(sys.version_info >= (3, 10))")


def python_for_other_users(monkeypatch) -> str:
    """An interpreter, and a temp directory, that other users can reach, as the sandbox needs where root must change
    its uid before it builds (or without) a private root: this Python, else the system's; the pinned temp dir."""
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and subprocess.run([python, "-c", OTHERS_CAN_RUN], capture_output=True,
                                                     text=True).stdout == "True\n":
            return python
    pytest.skip("no Python and temp directory here that other users can reach, as root's fallbacks need")


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the fallbacks are checked as root, as pods often run")


@root_only
@pytest.mark.parametrize("setup, got_through", [(NO_LANDLOCK, []), (NO_NAMESPACES, ["fill the disk"])],
                         ids=["without-landlock", "without-namespaces"])
def test_with_a_layer_missing_the_escapes_are_still_held(setup, got_through, host, monkeypatch):
    require_every_layer()
    python = python_for_other_users(monkeypatch) if setup in AS_ANOTHER_USER else sys.executable
    program = probe_program(PROBES, host.where | {"connection": "CONNECTION"})
    output = run_evaluator(setup, f"""
        import socket
        server = socket.create_server(("127.0.0.1", 0))
        connection = socket.create_connection(server.getsockname())  # this evaluator's own, for the code to take
        print(execute({program!r}.replace("CONNECTION", str(connection.fileno())), {PROBE_LIMITS!r}).stdout)
    """, python)
    outcomes = dict(line.split(": ", 1) for line in output.splitlines() if line)
    assert sorted(outcomes) == sorted(PROBES), output
    assert [name for name in PROBES if outcomes[name] == "GOT THROUGH"] == got_through, output
    host.assert_untouched()


@root_only
def test_without_landlock_a_mount_below_a_readable_tree_is_read_only_too():
    # The private root binds /usr (say) with every mount below it; each of them must be read-only, not just /usr.
    require_every_layer()
    below_usr, unshare = "/usr/local/src", shutil.which("unshare")
    if unshare is None or not os.path.isdir(below_usr):
        pytest.skip(f"no unshare(1), or no {below_usr} to mount on in a mount namespace of the test's own")
    output = run_evaluator(NO_LANDLOCK, f"""
        mount("tmpfs", {below_usr!r}, "tmpfs", 0, "size=1m,mode=777")  # this evaluator's namespace only
        token = {below_usr!r} + "/token"
        Path(token).write_text({SECRET!r})
        os.chmod(token, 0o666)  # writable by everyone: only the mount's read-only flag stands in the way
        result = execute(f"open({{token!r}}, 'a').write('overwritten')")
        print(Path(token).read_text(), result.returncode, "Read-only file system" in result.stderr)
    """, launcher=(unshare, "--mount", "--propagation", "private"))
    assert output == f"{SECRET} 1 True\n"


@root_only
def test_without_a_private_root_the_deepest_tree_the_code_leaves_is_removed(monkeypatch):
    # Its files are then on the host's disk; 3,000 nested directories are past shutil.rmtree's recursion and PATH_MAX.
    require_every_layer()
    program = "import os\nprint(os.getcwd())\nfor _ in range(3000):\n    os.mkdir('a')\n    os.chdir('a')\n"
    output = run_evaluator(NO_NAMESPACES, f"""
        result = execute({program!r})
        print(result.passed, os.path.exists(result.stdout.strip()), result.stdout.strip().startswith("/"))
    """, python_for_other_users(monkeypatch))
    assert output == "True False True\n"


LAYER_REPORT = """
    print(sandbox_available())
    try:
        print(execute("print('ran')", require=LAYERS).stdout.strip())
    except SandboxError as error:
        print(error)
"""
EVERY = " + ".join(LAYERS)
CANNOT = "the sandbox cannot isolate code here, missing: "
NO_UNSHARE = "unshare: Operation not permitted"
NO_LANDLOCK_WHY = "landlock (landlock_create_ruleset: Function not implemented)"


@root_only
@pytest.mark.parametrize("setup, report, required", [
    ("", (True, EVERY), "ran"),
    (USER_NAMESPACE, (True, EVERY), "ran"),
    (NO_LANDLOCK, (True, f"private root + network namespace + unprivileged uid + seccomp; missing: {NO_LANDLOCK_WHY}"),
     CANNOT + NO_LANDLOCK_WHY),
    (NO_NAMESPACES, (True, f"unprivileged uid + landlock + seccomp; missing: private root ({NO_UNSHARE}); "
                           f"network namespace ({NO_UNSHARE})"),
     CANNOT + f"private root ({NO_UNSHARE}); network namespace ({NO_UNSHARE})"),
    (NO_NAMESPACES + NO_LANDLOCK, (False, CANNOT + f"private root ({NO_UNSHARE}) or {NO_LANDLOCK_WHY}"),
     CANNOT + f"private root ({NO_UNSHARE}) or {NO_LANDLOCK_WHY}; network namespace ({NO_UNSHARE})"),
    (NO_SETUID, (False, CANNOT + "unprivileged uid (Operation not permitted)"),
     CANNOT + "unprivileged uid (Operation not permitted)"),
    (refusing(Rule("prctl", arg=0, when=(PR_SET_SECCOMP,))),
     (False, CANNOT + "seccomp (prctl(PR_SET_SECCOMP): Operation not permitted)"),
     CANNOT + "seccomp (prctl(PR_SET_SECCOMP): Operation not permitted)"),
], ids=["every-layer", "user-namespace", "no-landlock", "no-namespaces", "no-filesystem-layer", "no-uid-change",
        "no-seccomp"])
def test_each_layer_reports_whether_it_holds_and_code_never_runs_with_less_than_required(setup, report, required,
                                                                                        monkeypatch):
    require_every_layer()
    python = python_for_other_users(monkeypatch) if setup in AS_ANOTHER_USER else sys.executable
    assert run_evaluator(setup, LAYER_REPORT, python).splitlines() == [str(report), required]


@root_only
def test_a_python_other_users_cannot_read_is_named_as_the_reason(monkeypatch):
    """Root without CAP_SYS_ADMIN becomes the code's uid before it builds: a Python under /root (pyenv's, uv's) is
    then out of reach. (The refusal blamed the uid change, with a 'No such file' for a file that is there.)"""
    require_every_layer()
    if subprocess.run([sys.executable, "-c", OTHERS_CAN_RUN], capture_output=True, text=True).stdout == "True\n":
        pytest.skip("this Python is open to other users: nothing out of reach to name")
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())
    report = run_evaluator(USER_NAMESPACE, LAYER_REPORT).splitlines()[0]
    assert report.startswith(f"(False, \"{CANNOT}unprivileged uid (the code's uid cannot read Python's files (")
    assert report.endswith(f"{os.__file__}): install Python where every user may read it)\")")


def test_where_the_codes_uid_does_not_exist_the_report_names_that_layer():
    """A rootless container: root in a user namespace that maps root alone, where no other uid exists."""
    require_every_layer()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here to make a user namespace with")
    evaluator = "from nanochat_flyte.evaluation.sandbox import *\n" + textwrap.dedent(LAYER_REPORT)
    result = subprocess.run([unshare, "--map-root-user", sys.executable, "-c", evaluator], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0 and result.stderr.startswith("unshare:"):
        pytest.skip(f"no user namespace here: {result.stderr.strip()}")
    no_uid = CANNOT + "unprivileged uid (Operation not permitted)"
    report, refused = result.stdout.splitlines()
    assert report == str((False, no_uid)), result.stderr[-2000:]
    assert refused.startswith(no_uid)  # and every required layer it lacks besides (a tmpfs owned by the code's uid)


def test_the_network_namespace_alone_cuts_the_network():
    require_every_layer()
    with socket.create_server(("127.0.0.1", 0)) as server:
        lines = run_evaluator("", f"""
            import socket
            enter_namespaces(SANDBOX_UIDS[0])
            print(open("/proc/self/net/dev").read().count(":"), "interfaces")
            try:
                socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=3)
            except OSError:
                print("refused")
        """).splitlines()
    assert lines == ["1 interfaces", "refused"]  # the loopback, and it is down


def test_the_seccomp_filter_alone():
    lines = run_evaluator("", """
        import os, socket, threading
        install_seccomp_filter()
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            try:
                socket.socket(family, socket.SOCK_STREAM)
            except PermissionError:
                print("no socket", family.name)
        for name, call in (("socketpair", socket.socketpair), ("fork", os.fork),
                           ("spawn", lambda: os.posix_spawn("/bin/true", ["true"], {})),
                           ("kill the parent", lambda: os.kill(os.getppid(), 0))):
            try:
                call()
            except PermissionError:
                print("no", name)
        os.kill(os.getpid(), 0)  # itself, it may signal
        thread = threading.Thread(target=print, args=("thread ran",))
        thread.start()
        thread.join()
    """).splitlines()
    assert lines == ["no socket AF_INET", "no socket AF_INET6", "no socket AF_UNIX", "no socketpair", "no fork",
                     "no spawn", "no kill the parent", "thread ran"]


def test_the_seccomp_program_jumps_stay_inside_it():
    for machine in SYSCALLS:
        program = seccomp_program(machine, sandbox_rules(4321))
        for index, (code, jt, jf, _) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump
                assert index + 1 + max(jt, jf) < len(program)
        assert program[-1] == (0x06, 0, 0, 0x7FFF0000)  # anything not refused is allowed


def test_the_system_call_numbers_are_libseccomps():
    found = ctypes.util.find_library("seccomp")
    if found is None:
        pytest.skip("no libseccomp here to compare the system call numbers with")
    resolve = ctypes.CDLL(found).seccomp_syscall_resolve_name_arch
    resolve.argtypes, resolve.restype = (ctypes.c_uint32, ctypes.c_char_p), ctypes.c_int
    for machine, numbers in SYSCALLS.items():
        named = {name: number for name, number in numbers.items() if number is not None}
        assert {name: resolve(AUDIT_ARCH[machine], name.encode()) for name in named} == named, machine

# ------------------------------------------------------------------------------------------ lifetime


LIFETIME = """\
import ctypes, os, signal, time
libc = ctypes.CDLL(None)
open("left-behind", "w").write("x")
print(os.getpid(), os.getcwd(), libc.kill(os.getppid(), signal.SIGSTOP), libc.kill(os.getppid(), signal.SIGKILL),
      flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie is dead: only its exit status is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def is_child(proc: Path, parent: int) -> bool:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_code_cannot_stop_or_kill_its_evaluator_and_nothing_outlives_execute():
    output = run_evaluator("", f"""
        result = execute({LIFETIME!r}, Limits(timeout=2))
        print(result.stdout.strip(), result.timed_out)
    """)
    pid, workdir, stopped, killed, timed_out = output.split()
    assert (stopped, killed, timed_out) == ("-1", "-1", "True")  # both refused; the sleep ran into the timeout
    assert not alive(int(pid)) and not Path(workdir).exists()


# Threads cheap enough in address space to fill RLIMIT_NPROC within Limits.memory_bytes: one malloc arena, small stacks
THREAD_HOG = """
import ctypes, threading, time
ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
threading.stack_size(65536)
held = 0
try:
    while True:
        threading.Thread(target=time.sleep, args=(4,), daemon=True).start()
        held += 1
except RuntimeError:
    print(held, flush=True)
time.sleep(4)
"""


def test_a_program_holding_every_thread_it_may_leaves_the_others_theirs():
    """Each program has a uid of its own, so RLIMIT_NPROC, which counts a uid's threads, is its own too: one that
    takes all it may cannot starve another that runs at the same time (as all of nobody's once could)."""
    require_every_layer()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hog = pool.submit(execute, THREAD_HOG)
        time.sleep(1.5)  # the hog holds its threads by now
        other = execute("import os, threading\nthreads = [threading.Thread(target=print) for _ in range(8)]\n"
                        "[thread.start() for thread in threads]\nprint(os.getuid())")
        hog = hog.result()
    assert int(hog.stdout) >= Limits().processes - 4, hog.stdout  # all but a few, whatever Python holds itself
    assert other.passed, other.stderr
    assert int(other.stdout.splitlines()[-1]) in SANDBOX_UIDS or os.geteuid() != 0


def test_a_program_runs_as_a_uid_of_its_own_where_the_user_namespace_maps_one_else_as_nobody(tmp_path):
    """A rootless container maps 65,536 uids: none of SANDBOX_UIDS, which root could not become there."""
    everything, rootless = tmp_path / "everything", tmp_path / "rootless"
    everything.write_text("         0          0 4294967295\n")
    rootless.write_text("         0     100000      65536\n")
    assert sandbox_uid((str(everything), str(everything))) in SANDBOX_UIDS
    assert sandbox_uid((str(everything), str(rootless))) == sandbox_uid((str(tmp_path / "none"),)) == 65534
    assert is_mapped(65534, str(rootless)) and not is_mapped(65536, str(rootless))


def test_the_process_group_is_killed_before_the_child_is_reaped(monkeypatch):
    """Reaped first, the child's pid (its group's id) could go to another process, which killpg would then kill."""
    states = []

    def killpg(group: int, signal_number: int) -> None:
        try:  # None: still running; a result: exited, a zombie; ChildProcessError: reaped already
            states.append("running" if os.waitid(os.P_PID, group, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
                          else "exited")
        except ChildProcessError:
            states.append("reaped")
        real_killpg(group, signal_number)

    real_killpg = os.killpg
    monkeypatch.setattr(os, "killpg", killpg)
    assert execute("print('done')").passed and execute("import time\ntime.sleep(5)", Limits(timeout=1)).timed_out
    assert states == ["exited", "running"]


def test_the_sandbox_dies_with_its_evaluator(tmp_path):
    evaluator = subprocess.Popen([sys.executable, "-c", f"from nanochat_flyte.evaluation.sandbox import *\n"
                                                        f"execute({LIFETIME!r})"],
                                 cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 30
    while not (sandboxes := [int(p.name) for p in Path("/proc").glob("[0-9]*") if is_child(p, evaluator.pid)]):
        assert time.monotonic() < deadline and evaluator.poll() is None
        time.sleep(0.05)
    # isolated, its seccomp filter (the last layer) in place, the code sleeping
    while "Seccomp:\t2" not in Path(f"/proc/{sandboxes[0]}/status").read_text():
        assert time.monotonic() < deadline and evaluator.poll() is None
        time.sleep(0.05)
    evaluator.kill()  # from outside: nothing cleans up after it
    evaluator.wait()
    deadline = time.monotonic() + 5
    while alive(sandboxes[0]):
        assert time.monotonic() < deadline, "the sandbox outlived its evaluator"
        time.sleep(0.05)
    (workdir,) = tmp_path.iterdir()  # the evaluator's, left behind; what the code wrote is in its private root
    assert workdir.name.startswith("nanochat-sandbox-")
    assert os.listdir(workdir) == ([] if PRIVATE_ROOT in probe_sandbox()[0] else ["left-behind"])
