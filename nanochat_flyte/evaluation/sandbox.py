"""Run untrusted Python (code a model wrote, for HumanEval) so that it can touch nothing outside its own directory.

    result = execute("print(1 + 1)")        # ExecutionResult(passed=True, stdout="2\n", ...)
    available, why = sandbox_available()    # whether the sandbox works here, and which layers hold

The code runs in a fresh `python -I` process (this file, run as a script: `child_main`), which builds its layers
before it runs a line of the code. They overlap, so that no single one is trusted (docs/sandbox.md: what each
stops, and what is left when one is missing):
- private root: new mount, network and IPC namespaces. The root becomes an empty tmpfs that holds read-only binds
  of what Python needs (readable_paths()) and the work directory: a tmpfs of Limits.disk_bytes, gone with the
  process. The network namespace has one interface, a loopback that is down. Root makes the namespaces itself;
  anyone else inside a new user namespace that maps only its own uid.
- unprivileged uid: root becomes a uid of its own, which no account and no other program has, and every
  capability is dropped: /proc/sys, the host's files and other users' processes are out of reach by plain
  permissions.
- landlock: the kernel lets it read only readable_paths() and write only its work directory; no TCP; no signals
  or abstract unix sockets beyond its own process.
- seccomp: no sockets at all, no new processes or programs (threads are fine), signals only to itself, no ptrace,
  pidfd, process_vm_*, namespaces, mounts, keyrings, io_uring, memfd or SysV IPC.
- resources: RLIMIT_CPU, _AS, _FSIZE, _NPROC and _NOFILE, no core dumps (not dumpable, which the code may not
  undo), and a wall-clock timeout after which the parent kills the process group. It dies with the evaluator
  (PR_SET_PDEATHSIG, which the code may not reset).
- I/O: stdin is /dev/null, stdout and stderr are captured and truncated, the environment is scrubbed.
- a last layer in Python disables destructive functions (os.system, os.remove, ...), against accidents only.

A layer this kernel or container does not allow is left out, and said so (sandbox_available(), and each
ExecutionResult's isolation and missing). The code never runs without seccomp, an unprivileged uid, and a
filesystem layer (landlock or the private root): execute() raises SandboxError instead.

The seccomp filter is BPF written here, for x86_64 and aarch64: libseccomp's own Python bindings are not on PyPI,
and pyseccomp, which wraps the system's libseccomp with ctypes, has had no release since 2021 and runs `ldconfig`
in a subprocess when imported. tests/test_sandbox.py checks the system call numbers below against libseccomp's.
"""

import contextlib
import ctypes
import errno
import functools
import json
import os
import platform
import random
import re
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds, interpreter start included; HumanEval's tests take well under one
    memory_bytes: int = 512 * 2**20  # address space: Python itself needs ~30 MB of it
    output_bytes: int = 64 * 2**10  # of stdout and of stderr, each (the first and last halves): any traceback
    file_bytes: int = 16 * 2**20  # the largest file the code may write
    disk_bytes: int = 64 * 2**20  # all its files together: the work directory is a tmpfs, so this is memory
    processes: int = 64  # RLIMIT_NPROC: its uid's processes and threads (run by root, a uid of its own)
    open_files: int = 64  # RLIMIT_NOFILE: a pipe's buffer or an epoll is kernel memory, which the address space
    #                       limit does not count (a full pipe holds 64 KiB: 32 pipes, 2 MiB); Python keeps under 10


# The layers, as ExecutionResult.isolation and .missing name them.
LAYERS = PRIVATE_ROOT, NETWORK_NAMESPACE, UNPRIVILEGED, LANDLOCK, SECCOMP = (
    "private root", "network namespace", "unprivileged uid", "landlock", "seccomp")


@dataclass
class ExecutionResult:
    returncode: int | None  # None when it was killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool  # stdout or stderr was longer than Limits.output_bytes: its middle is left out
    seconds: float
    isolation: tuple[str, ...]  # the layers that held, e.g. ("private root", ..., "seccomp")
    missing: dict[str, str]  # the layers that did not, and why

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """This machine cannot isolate the code as required (so it did not run), or the child failed before trying."""


# ------------------------------------------------------------------------------------------ the parent side


SAFE_PATH = "/usr/bin:/bin"
# The uids root runs programs as, one drawn for each: a range no account has (useradd's stop below 60000, and
# container runtimes' subordinate ranges start at 100000, 65536 each). Were they one uid (nobody, shared with every
# other sandbox running at once and the host's own nobody processes), RLIMIT_NPROC, which counts all of a uid's
# threads, would let one program keep the others from starting a thread.
SANDBOX_UIDS = range(0x60000000, 0x70000000)
# Where this user namespace does not map them (a rootless container maps 65,536 uids), programs run as nobody, the
# overflow uid and gid, which owns no file, no process and no privilege, and share its RLIMIT_NPROC.
NOBODY = 65534
ID_MAPS = ("/proc/self/uid_map", "/proc/self/gid_map")


def sandbox_uid(id_maps: tuple[str, ...] = ID_MAPS) -> int:
    """The uid (and gid) a program runs as under root: one of its own from SANDBOX_UIDS (2**28 of them: two
    programs at once share none), where this user namespace maps it; else nobody."""
    uid = random.SystemRandom().choice(SANDBOX_UIDS)
    return uid if all(is_mapped(uid, id_map) for id_map in id_maps) else NOBODY


def is_mapped(id_: int, id_map: str) -> bool:
    """Whether a user namespace's uid_map or gid_map (lines "first-inside first-outside count") maps id_."""
    try:
        ranges = [line.split() for line in Path(id_map).read_text().splitlines()]
    except OSError:
        return False
    return any(int(first) <= id_ < int(first) + int(count) for first, _, count in ranges)


def execute(code: str, limits: Limits = Limits(), require: tuple[str, ...] = ()) -> ExecutionResult:
    """Run code in the sandbox. Any string gives a result; raises SandboxError only when this machine cannot hold
    the essential layers or one in `require`, or when the sandbox process died before it isolated itself (the code
    then did not run)."""
    start = time.monotonic()
    uid = sandbox_uid()
    ack_read, ack_write = os.pipe()  # the child reports on it which layers hold
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    with contextlib.ExitStack() as cleanup, open(ack_read, "rb") as ack_file:
        cleanup.callback(remove_tree, workdir)
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.abspath(__file__), str(os.getpid()), str(ack_write),
                 json.dumps(asdict(limits)), json.dumps(list(require)), str(uid)],
                cwd=workdir, env={"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                                  "OMP_NUM_THREADS": "1"},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(ack_write,),
                start_new_session=True)  # its own process group: one killpg() ends it and anything it started
        finally:
            os.close(ack_write)  # the child's copy is the only one left: EOF once it closes it or dies
        try:
            try:  # surrogatepass: even lone surrogates reach the child, whose compile() refuses them
                process.stdin.write(code.encode("utf-8", errors="surrogatepass"))
                process.stdin.close()
            except BrokenPipeError:
                pass  # the child died before reading the code: its stderr says why
            stdout, stderr, truncated, timed_out = collect_output(process, start + limits.timeout,
                                                                  limits.output_bytes)
        finally:
            kill_group(process)
        ack = ack_file.read()
    stderr_text = stderr.decode("utf-8", errors="replace")
    report = json.loads(ack) if ack else {}
    if "refused" in report:
        raise SandboxError(report["refused"])
    if "isolation" not in report:
        last_line = (stderr_text.strip().splitlines() or ["no output"])[-1]
        raise SandboxError(f"the sandbox process ended before it isolated itself ({last_line})")
    return ExecutionResult(returncode=None if timed_out else process.returncode,
                           stdout=stdout.decode("utf-8", errors="replace"), stderr=stderr_text, timed_out=timed_out,
                           truncated=truncated, seconds=time.monotonic() - start,
                           isolation=tuple(report["isolation"]), missing=report["missing"])


def remove_tree(path: str) -> None:
    """Remove the work directory and whatever the code left in it (without a private root, the code's files are on
    the host's disk). Not shutil.rmtree, which recurses once per level: a program that nests 1,000 directories makes
    it raise RecursionError on Python 3.11, and their full paths outgrow PATH_MAX. coreutils walk any depth; chmod
    first, because the code may have closed its own directories to their owner."""
    for command in (["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
        subprocess.run(command, env={"PATH": SAFE_PATH}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # what they say names the code's files: model-written text
    if os.path.lexists(path):
        print(f"sandbox: could not remove {path}", file=sys.stderr, flush=True)


class Captured:
    """A stream's first cap/2 bytes and its last cap/2: what a program printed last (HumanEval's pass sentinel, a
    traceback) survives any amount of output before it."""

    def __init__(self, cap: int):
        self.head, self.tail, self.half, self.truncated = bytearray(), bytearray(), cap // 2, False

    def add(self, data: bytes) -> None:
        taken = min(len(data), max(0, self.half - len(self.head)))
        self.head += data[:taken]
        self.tail += data[taken:]
        if len(self.tail) > self.half:
            del self.tail[:len(self.tail) - self.half]
            self.truncated = True

    def bytes(self) -> bytes:
        return bytes(self.head + self.tail)


def collect_output(process: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """(stdout, stderr, truncated, timed_out): read both pipes until they close and the process exits, or until
    the deadline. Of more than `cap` bytes the middle is read and dropped (Captured), so the child never blocks on a
    full pipe."""
    captured = {process.stdout: Captured(cap), process.stderr: Captured(cap)}
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for stream in captured:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and not timed_out:
            remaining = deadline - time.monotonic()
            timed_out = remaining <= 0
            for key, _ in [] if timed_out else selector.select(remaining):
                data = os.read(key.fd, 65536)
                if data:
                    captured[key.fileobj].add(data)
                else:
                    selector.unregister(key.fileobj)
    if not timed_out:
        timed_out = not exited_unreaped(process.pid, deadline)  # else it closed its pipes but went on running
    stdout, stderr = captured[process.stdout], captured[process.stderr]
    return stdout.bytes(), stderr.bytes(), stdout.truncated or stderr.truncated, timed_out


def exited_unreaped(pid: int, deadline: float) -> bool:
    """Whether child `pid` exited by the deadline. It is left unreaped (a zombie), so that its pid, which is its
    process group's id, cannot be given to another process before kill_group has signalled the group."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group, then reap the child (not before: its id could be reused meanwhile)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()


PROBE = """\
import ctypes, socket
reached = []
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    reached.append("the evaluator's port {port}")
except OSError:
    pass
try:
    open({outside!r}).close()
    reached.append("a file outside its directory")
except OSError:
    pass
if ctypes.CDLL(None).kill({evaluator}, 0) == 0:
    reached.append("the evaluator, with a signal")
if reached:
    raise SystemExit("the sandboxed code reached " + ", ".join(reached))
"""


@functools.cache
def probe_sandbox() -> tuple[tuple[str, ...], str]:
    """(the layers that hold here, a description), from a probe run once per process: the sandboxed code must fail
    to reach a port this process listens on, a file it made, and this process. No layers where the sandbox does not
    work here; the description then says why."""
    if sys.platform != "linux":
        return (), f"the sandbox needs Linux (namespaces, landlock, seccomp); this is {sys.platform}"
    with socket.create_server(("127.0.0.1", 0)) as server, tempfile.NamedTemporaryFile() as outside:
        try:
            result = execute(PROBE.format(port=server.getsockname()[1], outside=outside.name, evaluator=os.getpid()))
        except SandboxError as error:
            return (), str(error)
    if not result.passed:
        return (), f"the probe failed: {(result.stderr or result.stdout).strip()}"
    missing = "; ".join(f"{name} ({why})" for name, why in result.missing.items())
    return result.isolation, " + ".join(result.isolation) + (f"; missing: {missing}" if missing else "")


def sandbox_available() -> tuple[bool, str]:
    """(True, the layers that hold and those missing) where the sandbox works here, else (False, why not)."""
    layers, description = probe_sandbox()
    return bool(layers), description

# ------------------------------------------------------------------------------------------ the child side


libc = ctypes.CDLL(None, use_errno=True)
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # the machines the filter is written for
NUMBERS = {  # the system calls used here, (x86_64, aarch64) from asm/unistd*.h; aarch64 has no fork or vfork
    "shmget": (29, 194), "socket": (41, 198), "socketpair": (53, 199), "clone": (56, 220), "fork": (57, None),
    "vfork": (58, None), "execve": (59, 221), "kill": (62, 129), "semget": (64, 190), "msgget": (68, 186),
    "fcntl": (72, 25),
    "ptrace": (101, 117), "rt_sigqueueinfo": (129, 138), "setpriority": (141, 140), "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119), "pivot_root": (155, 41), "prctl": (157, 167), "chroot": (161, 51),
    "mount": (165, 40), "umount2": (166, 39), "tkill": (200, 130), "sched_setaffinity": (203, 122),
    "tgkill": (234, 131), "mq_open": (240, 180), "add_key": (248, 217), "request_key": (249, 218),
    "keyctl": (250, 219), "ioprio_set": (251, 30), "unshare": (272, 97), "rt_tgsigqueueinfo": (297, 240),
    "perf_event_open": (298, 241), "prlimit64": (302, 261), "open_by_handle_at": (304, 265), "setns": (308, 268),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "sched_setattr": (314, 274),
    "memfd_create": (319, 279), "bpf": (321, 280), "execveat": (322, 281), "userfaultfd": (323, 282),
    "pidfd_send_signal": (424, 424), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "pidfd_open": (434, 434),
    "clone3": (435, 435), "pidfd_getfd": (438, 438), "mount_setattr": (442, 442),
    "landlock_create_ruleset": (444, 444), "landlock_add_rule": (445, 445), "landlock_restrict_self": (446, 446),
}
SYSCALLS = {machine: {name: numbers[index] for name, numbers in NUMBERS.items()}
            for index, machine in enumerate(AUDIT_ARCH)}


def check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def syscall(name: str, *args) -> int:
    """A system call glibc has no wrapper for (pivot_root, landlock); raises OSError naming it."""
    return check(libc.syscall(SYSCALLS[platform.machine()][name], *args), name)

# --------------------------------------------------------------- namespaces and the private root


PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38  # <linux/prctl.h>
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs's ST_* flags equal mount's MS_* ones; a bind's remount inside a user namespace must keep them
KEPT_FLAGS = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME | os.ST_RELATIME
WORK_INODES = 4096  # files and directories the code may make: each costs kernel memory beyond disk_bytes


def enter_namespaces(sandbox_uid: int) -> None:
    """New mount, network and IPC namespaces. Root makes them itself: they then belong to the host's user
    namespace, and no new one is needed. Anyone else, or root without CAP_SYS_ADMIN, makes them inside a new user
    namespace that maps only its own uid and gid (root becomes sandbox_uid first: it could not be mapped later)."""
    if os.geteuid() == 0 and libc.unshare(NAMESPACES) == 0:
        return
    if os.geteuid() == 0:
        become(sandbox_uid)
        # the uid change gave /proc/self to root: dumpable again (until set_limits), it may write the maps below
        check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWUSER | NAMESPACES), "unshare")
    for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(line)


def readable_paths() -> list[str]:
    """What the code may read: the interpreter, the system's libraries, the two /etc files Python reads (the
    dynamic linker's cache, the time zone) and two devices. Not the rest of /etc, nor /home, /root, /proc, /run,
    /var or /tmp, where secrets and sockets live. Each tree once, by its top."""
    candidates = {"/usr", "/lib", "/lib32", "/lib64", "/libx32", sys.base_prefix, sys.prefix, "/etc/ld.so.cache",
                  "/etc/localtime", "/dev/null", "/dev/urandom"}
    paths = sorted(os.path.abspath(path) for path in candidates if os.path.lexists(path))
    return [path for path in paths if path != "/" and not any(path.startswith(top + "/") for top in paths)]


def mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    encoded = [value.encode() if value is not None else None for value in (source, target, fstype, options)]
    check(libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]), f"mount {target}")


def mount_points(top: str) -> list[str]:
    """The mount points at top and below it, in the order they were mounted (a parent before its children): the
    fifth field of /proc/self/mountinfo, where a space, tab, newline or backslash is written as an octal escape."""
    points = []
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), line.split()[4]))
        if point == top or point.startswith(top + "/"):
            points.append(point)
    return points


def enter_private_root(workdir: str, owner: tuple[int, int], disk_bytes: int) -> None:
    """Make an empty tmpfs this process's root, holding read-only binds of readable_paths() and, at its own path,
    the work directory: a tmpfs of disk_bytes owned by `owner` (uid, gid). Nothing else of the host is there, and
    nothing written there reaches the host's disk. Should it fail, the host's tree is left as it was."""
    os.umask(0o022)  # the directories made here must be searchable by the code
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted below reaches the host's mounts, nor theirs us
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")  # the new root
    try:
        for path in readable_paths():
            target = workdir + path
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.islink(path):  # /lib -> usr/lib on a merged /usr: the same link, to the same bind
                os.symlink(os.readlink(path), target)
                continue
            if os.path.isdir(path):
                os.mkdir(target)
            else:
                open(target, "x").close()  # a file's bind needs a file to cover
            mount(path, target, None, MS_BIND | MS_REC)
            for point in mount_points(target):  # a remount covers one mount: each below it keeps its own flags
                mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (os.statvfs(point).f_flag & KEPT_FLAGS))
        os.makedirs(workdir + workdir)
        mount("tmpfs", workdir + workdir, "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={disk_bytes},nr_inodes={WORK_INODES},mode=700,uid={owner[0]},gid={owner[1]}")
        os.mkdir(workdir + "/.host")
        syscall("pivot_root", workdir.encode(), (workdir + "/.host").encode())
    except OSError:
        libc.umount2(workdir.encode(), MNT_DETACH)  # the new root and all in it
        raise
    os.chdir("/")
    check(libc.umount2(b"/.host", MNT_DETACH), "umount /.host")  # the host's tree, gone from this namespace
    os.rmdir("/.host")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(workdir)

# --------------------------------------------------------------- identity


class CapHeader(ctypes.Structure):  # <linux/capability.h>
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAPABILITY_VERSION_3 = 0x20080522  # 64-bit capability sets, as two CapData


def become(uid: int) -> None:
    """Root gives up its uid and gids for `uid` (as uid and gid), and with them every capability."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def drop_privileges(sandbox_uid: int) -> None:
    """Become sandbox_uid if root, and drop every capability (a new user namespace gives all of them, within it)."""
    if os.geteuid() == 0:
        become(sandbox_uid)
    check(libc.capset(ctypes.byref(CapHeader(CAPABILITY_VERSION_3, 0)), ctypes.byref((CapData * 2)())), "capset")

# --------------------------------------------------------------- limits and lifetime


def set_limits(limits: Limits) -> None:
    """Hard limits equal to the soft ones: the code cannot raise them (without CAP_SYS_RESOURCE on the host). No
    core dumps: RLIMIT_CORE 0, and not dumpable, which also holds where core_pattern pipes a dump to a helper
    (systemd-coredump, apport) that the kernel runs as root whatever RLIMIT_CORE says; seccomp keeps it so."""
    cpu_seconds = int(limits.timeout) + 1  # a backstop to the wall clock: a busy loop dies even if we did not
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, limits.processes),
                         (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def die_with(evaluator: int) -> None:
    """SIGKILL this process when the evaluator's thread that started it ends. After the uid change, which clears
    it; seccomp then keeps the code from resetting it."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != evaluator:  # it ended before the line above: nothing would kill us
        os._exit(1)


def no_new_privs() -> None:
    """No setuid binary or file capability gains anything; landlock and seccomp require it of the unprivileged."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")

# --------------------------------------------------------------- landlock


class RulesetAttr(ctypes.Structure):  # <linux/landlock.h>
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


CREATE_RULESET_VERSION, RULE_PATH_BENEATH = 1, 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
MAKE_DIR, MAKE_REG, MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 7, 1 << 8, 1 << 12, 1 << 13, 1 << 14, 1 << 15
READ = READ_FILE | READ_DIR
WORK = READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER | TRUNCATE
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all a rule on a file (not a directory) may hold
TCP_BIND_AND_CONNECT = SCOPE_ABSTRACT_UNIX_AND_SIGNAL = 0b11


def restrict_filesystem() -> None:
    """Landlock: read readable_paths(), write /dev/null and the work directory, nothing else. Every file right this
    kernel knows is handled (denied but where granted); from ABI 4, TCP bind and connect too; from ABI 6, signals
    and abstract unix sockets to processes outside this one. The work directory is granted as the current one:
    without a private root, the path to it may be closed to other users."""
    abi = syscall("landlock_create_ruleset", None, 0, CREATE_RULESET_VERSION)
    handled = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1  # ABI 2 added REFER, 3 TRUNCATE, 5 IOCTL_DEV
    attr = RulesetAttr(handled, TCP_BIND_AND_CONNECT if abi >= 4 else 0,
                       SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # an older kernel takes only the fields it knows
    ruleset = syscall("landlock_create_ruleset", ctypes.byref(attr), size, 0)
    grants = dict.fromkeys(readable_paths(), READ) | {"/dev/null": READ_FILE | WRITE_FILE, ".": WORK}
    no_new_privs()
    try:
        for path, rights in grants.items():
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= FILE_RIGHTS
                rule = PathBeneathAttr(rights & handled, fd)
                syscall("landlock_add_rule", ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            finally:
                os.close(fd)
        syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)

# --------------------------------------------------------------- seccomp


# seccomp-BPF (<linux/filter.h>, <linux/seccomp.h>): a program over struct seccomp_data {int nr; u32 arch;
# u64 instruction_pointer; u64 args[6]}, run at every system call; its return value decides.
LOAD = 0x20  # BPF_LD | BPF_W | BPF_ABS: load the 32-bit word at offset k
AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
JEQ, JGE = 0x15, 0x35  # BPF_JMP | BPF_JEQ / BPF_JGE | BPF_K: jump jt if true, else jf
RET = 0x06  # BPF_RET | BPF_K
NR_OFFSET, ARCH_OFFSET, ARGS_OFFSET = 0, 4, 16  # an argument's low 32 bits (both machines are little-endian)
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000  # ERRNO | errno: fail the call with errno
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers
CLONE_THREAD = 0x00010000
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15  # fcntl(2): who gets a file's SIGIO and SIGURG, and as which signal
F_SETPIPE_SZ = 1031  # fcntl(2): a pipe's buffer, 64 KiB by default, up to /proc/sys/fs/pipe-max-size (1 MiB)
CLONE_NEW_ANY = 0x7E020000  # every CLONE_NEW* flag: a thread may not make a namespace either


@dataclass(frozen=True)
class Rule:
    """Refuse a system call with `error`; with `arg`, only unless (or only when) that argument's low 32 bits,
    masked, equal one of the values. A pid argument takes 32 bits in the kernel, whatever the register holds."""
    name: str
    error: int = errno.EPERM
    arg: int | None = None
    unless: tuple[int, ...] = ()
    when: tuple[int, ...] = ()
    mask: int = 0xFFFFFFFF


REFUSED_CALLS = (
    "socket", "socketpair",  # no network, no unix sockets: HumanEval needs none
    "fork", "vfork", "execve", "execveat",  # no new process, no other program
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "tkill",  # no reach into other processes (tkill names a thread of any process)
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "open_by_handle_at",  # the filesystem stays as it was built
    "add_key", "request_key", "keyctl",  # the keyrings are shared with the host
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "userfaultfd", "perf_event_open",
    "memfd_create", "shmget", "semget", "msgget", "mq_open",  # memory outside the limits; IPC that outlives us
    # priorities: who=0 with PRIO_USER (or IOPRIO_WHO_USER) is every process of the uid, the evaluator's included,
    # and an unprivileged process cannot raise a priority back
    "setpriority", "ioprio_set",
)


def sandbox_rules(pid: int) -> list[Rule]:
    """What the code, as process `pid`, may not do."""
    return [*(Rule(name) for name in REFUSED_CALLS),
            Rule("clone3", errno.ENOSYS),  # ENOSYS: libc falls back to clone, whose flags the next rule can read
            Rule("clone", arg=0, mask=CLONE_THREAD | CLONE_NEW_ANY, unless=(CLONE_THREAD,)),  # threads only
            *(Rule(name, arg=0, unless=(pid,)) for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")),
            *(Rule(name, arg=0, unless=(0, pid)) for name in ("prlimit64", "sched_setaffinity", "sched_setparam",
                                                              "sched_setscheduler", "sched_setattr")),
            # a pipe whose owner is another process signals it (SIGIO, deadly by default) at every write; a pipe's
            # buffer is kernel memory, which Limits.open_files bounds only while each keeps its default size
            Rule("fcntl", arg=1, when=(F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETPIPE_SZ)),
            # it must die with the evaluator, and leave no core dump
            Rule("prctl", arg=0, when=(PR_SET_PDEATHSIG, PR_SET_DUMPABLE))]


def seccomp_program(machine: str, rules: list[Rule]) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: the rules, and everything else allowed. Another
    architecture's calls kill the process; x32 calls fail."""
    numbers = SYSCALLS[machine]
    program = [(LOAD, 0, 0, ARCH_OFFSET), (JEQ, 1, 0, AUDIT_ARCH[machine]), (RET, 0, 0, KILL_PROCESS),
               (LOAD, 0, 0, NR_OFFSET)]
    if machine == "x86_64":
        program += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, ERRNO | errno.ENOSYS)]
    for rule in rules:
        if numbers[rule.name] is None:
            continue  # fork and vfork on aarch64: libc makes them with clone, which is filtered
        refuse = (RET, 0, 0, ERRNO | rule.error)
        if rule.arg is None:
            block = [refuse]
        else:  # load the argument, compare it with each value; both outcomes return
            values = rule.unless or rule.when
            matched, unmatched = ((RET, 0, 0, ALLOW), refuse) if rule.unless else (refuse, (RET, 0, 0, ALLOW))
            block = [(LOAD, 0, 0, ARGS_OFFSET + 8 * rule.arg)]
            block += [(AND, 0, 0, rule.mask)] if rule.mask != 0xFFFFFFFF else []
            block += [(JEQ, len(values) - index, 0, value) for index, value in enumerate(values)]
            block += [unmatched, matched]
        program += [(JEQ, 0, len(block), numbers[rule.name]), *block]
    return program + [(RET, 0, 0, ALLOW)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def install_filter(program: list[tuple[int, int, int, int]]) -> None:
    """Apply a seccomp-BPF program to this process and everything it will start."""
    instructions = (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))
    no_new_privs()  # required to install a filter without CAP_SYS_ADMIN
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(SockFprog(len(program), instructions)), 0, 0),  # 2: filter
          "prctl(PR_SET_SECCOMP)")


def install_seccomp_filter() -> None:
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"seccomp: no filter written for {machine}")
    install_filter(seccomp_program(machine, sandbox_rules(os.getpid())))

# --------------------------------------------------------------- the child, in order


def isolate(workdir: str, evaluator: int, limits: Limits, sandbox_uid: int) -> tuple[list[str], dict[str, str]]:
    """Build every layer this machine allows, in the order they need: namespaces and mounts while privileged, then
    the uid, then what the code may not undo. Returns (the layers held, {missing layer: why})."""
    held, missing = [], {}
    if os.geteuid() == 0:
        # the code's, for when no private root covers it; where its uid does not exist (a user namespace that maps
        # root alone: EINVAL), becoming it fails below too, and the refusal names that layer
        with contextlib.suppress(OSError):
            os.chown(workdir, sandbox_uid, sandbox_uid)
    try:
        enter_namespaces(sandbox_uid)
        held.append(NETWORK_NAMESPACE)
        enter_private_root(workdir, (sandbox_uid,) * 2 if os.geteuid() == 0 else (os.geteuid(), os.getegid()),
                           limits.disk_bytes)
        held.append(PRIVATE_ROOT)
    except OSError as error:
        missing.update(dict.fromkeys({PRIVATE_ROOT, NETWORK_NAMESPACE} - set(held), why(error)))
    try:
        drop_privileges(sandbox_uid)
        reach_python()
        held.append(UNPRIVILEGED)
    except OSError as error:
        missing[UNPRIVILEGED] = why(error)
    die_with(evaluator)
    set_limits(limits)  # after the uid change: the code's uid cannot raise them again
    for name, build in ((LANDLOCK, restrict_filesystem), (SECCOMP, install_seccomp_filter)):
        try:
            build()
            held.append(name)
        except OSError as error:
            missing[name] = why(error)
    return sorted(held, key=LAYERS.index), dict(sorted(missing.items(), key=lambda item: LAYERS.index(item[0])))


def reach_python() -> None:
    """OSError unless the code's uid reads Python's standard library: root's Python under a folder of root's alone
    (/root/.pyenv) is reached by neither the host's path nor a bind of it."""
    try:
        os.stat(os.__file__)
    except OSError as error:
        raise OSError(error.errno, f"the code's uid cannot read Python's files ({why(error)}): install Python where "
                                   "every user may read it") from None


def why(error: OSError) -> str:
    return f"{error.strerror}: {error.filename}" if error.filename else error.strerror


def refusal(held: list[str], missing: dict[str, str], require: list[str]) -> str | None:
    """Why the code must not run with only these layers, or None. It needs seccomp, an unprivileged uid, landlock
    or the private root, and each layer in `require`."""
    unmet = []
    for need in [{SECCOMP}, {UNPRIVILEGED}, {LANDLOCK, PRIVATE_ROOT}, *({name} for name in require)]:
        if not need & set(held) and not any(need <= other for other in unmet):  # each missing layer once
            unmet.append(need)
    reasons = "; ".join(" or ".join(f"{name} ({missing[name]})" for name in sorted(need, key=LAYERS.index))
                        for need in unmet)
    return f"the sandbox cannot isolate code here, missing: {reasons}" if unmet else None


def disable_destructive_functions() -> None:
    """Against accidents only (ctypes gets around it): the kernel layers above are the barrier."""
    import builtins
    import shutil

    for name in ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
                 "rename", "renames", "replace", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown",
                 "chroot", "setuid", "putenv", "unsetenv"):
        setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    builtins.help = None  # it starts a pager


def child_main(evaluator: int, ack_fd: int, limits: Limits, require: list[str], sandbox_uid: int) -> None:
    """Read the code from stdin, isolate, report on ack_fd, run the code."""
    code = sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code gets no input
    os.close(devnull)
    held, missing = isolate(os.getcwd(), evaluator, limits, sandbox_uid)
    if reason := refusal(held, missing, require):
        os.write(ack_fd, json.dumps({"refused": reason}).encode())
        sys.exit(1)
    os.write(ack_fd, json.dumps({"isolation": held, "missing": missing}).encode())
    os.close(ack_fd)
    disable_destructive_functions()
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), Limits(**json.loads(sys.argv[3])), json.loads(sys.argv[4]),
               int(sys.argv[5]))
