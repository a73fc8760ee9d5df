"""Run untrusted Python (code a model wrote, for HumanEval) in a sandbox.

    result = execute("print(1 + 1)")        # ExecutionResult(passed=True, stdout="2\n", ...)
    available, why = sandbox_available()    # whether the isolation really works on this machine

The code runs in a fresh `python -I` process (this file, run as a script: `child_main`), which isolates itself
before it runs a line of the code:
- network: the kernel refuses it, two ways, and at least one must hold or the code does not run:
  * a new, empty network namespace (unshare(2); only a loopback interface, and that one is down), preferably
    inside a new user namespace, which also takes away the process's capabilities on the host (so, run as root,
    it can no longer raise its resource limits back);
  * a seccomp filter: socket(2) only for AF_UNIX, no io_uring (which can open sockets too).
- processes: the seccomp filter also refuses fork, vfork and clone without CLONE_THREAD (threads still work),
  and ptrace; RLIMIT_NPROC caps processes and threads too (the kernel never applies it to root, so the filter
  is what stops a fork bomb there).
- resources: RLIMIT_CPU (CPU seconds), RLIMIT_AS (memory), RLIMIT_FSIZE (file size), no core dumps; a wall-clock
  timeout, after which the parent kills the whole process group (the child starts its own session).
- I/O: stdin is /dev/null once the code is read from it; stdout and stderr are captured and truncated; the
  environment is scrubbed; the working directory is a new, empty temporary directory, deleted afterwards.
- a second layer in Python: destructive functions (os.system, os.remove, shutil.rmtree, subprocess.Popen, ...)
  are disabled, against accidents; it is no barrier (ctypes undoes it), the kernel layers are.

Namespaces and seccomp need Linux. unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN (root in a VM or a privileged
container) or unprivileged user namespaces; seccomp filters need neither, only a kernel and container runtime
that allow seccomp(2) (Docker's default profile does). sandbox_available() runs a probe: the
code must fail to connect to a socket this process listens on at 127.0.0.1.
The filesystem is not isolated: the code runs as the evaluating user and can read (and, but for the Python layer,
write) what that user can.
"""

import ctypes
import errno
import functools
import json
import os
import platform
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds, interpreter start included; HumanEval's tests take well under one
    memory_bytes: int = 512 * 2**20  # address space: Python itself needs ~30 MB of it
    output_bytes: int = 64 * 2**10  # of stdout and of stderr, each: enough for any traceback
    file_bytes: int = 16 * 2**20  # the largest file the code may write
    processes: int = 64  # RLIMIT_NPROC: counts this user's processes and threads (within a new user namespace,
    #                      only the sandbox's own)


@dataclass
class ExecutionResult:
    returncode: int | None  # None when it was killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool  # stdout or stderr was longer than Limits.output_bytes
    seconds: float
    isolation: tuple[str, ...]  # the kernel layers that held, e.g. ("user+network namespace", "seccomp")

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """The sandbox could not isolate the code (so it did not run it), or its child failed before trying."""


# ------------------------------------------------------------------------------------------ the parent side

ISOLATED, REFUSED = b"isolated:", b"refused:"  # how the child's report on the ack pipe starts
SAFE_PATH = "/usr/bin:/bin"


def execute(code: str, limits: Limits = Limits()) -> ExecutionResult:
    """Run code in the sandbox; raises SandboxError when the isolation failed (the code then did not run)."""
    start = time.monotonic()
    ack_read, ack_write = os.pipe()  # the child reports on it whether it isolated itself
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as workdir, open(ack_read, "rb") as ack_file:
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.abspath(__file__), str(ack_write), json.dumps(asdict(limits))],
                cwd=workdir, env={"PATH": SAFE_PATH, "HOME": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(ack_write,),
                start_new_session=True)  # its own process group: one killpg() ends it and anything it started
        finally:
            os.close(ack_write)  # the child's copy is the only one left: EOF once it closes it or dies
        try:
            try:
                process.stdin.write(code.encode("utf-8", errors="surrogateescape"))
                process.stdin.close()
            except BrokenPipeError:
                pass  # the child died before reading the code: its stderr says why
            stdout, stderr, truncated, timed_out = collect_output(process, start + limits.timeout,
                                                                  limits.output_bytes)
        finally:
            kill_group(process)
        ack = ack_file.read()
    stderr_text = stderr.decode("utf-8", errors="replace")
    if ack.startswith(REFUSED):
        raise SandboxError(ack[len(REFUSED):].decode().strip())
    if not ack.startswith(ISOLATED):
        last_line = (stderr_text.strip().splitlines() or ["no output"])[-1]
        raise SandboxError(f"the sandbox process ended before it isolated itself ({last_line})")
    return ExecutionResult(returncode=None if timed_out else process.returncode,
                           stdout=stdout.decode("utf-8", errors="replace"), stderr=stderr_text, timed_out=timed_out,
                           truncated=truncated, seconds=time.monotonic() - start,
                           isolation=tuple(ack[len(ISOLATED):].decode().split(",")))


def collect_output(process: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """(stdout, stderr, truncated, timed_out): read both pipes until they close and the process exits, or until
    the deadline. Output past `cap` bytes is read and dropped, so the child never blocks on a full pipe."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    truncated = False
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), truncated, True
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                keep = max(0, cap - len(buffer))
                truncated |= len(data) > keep
                buffer += data[:keep]
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:  # it closed its pipes but went on running
        timed_out = True
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), truncated, timed_out


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (before reaping the child, so its id cannot be reused meanwhile)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()


NETWORK_PROBE = """\
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
except OSError as error:
    print(type(error).__name__, error)
else:
    raise SystemExit("connected to the parent's port {port}: the network is not isolated")
"""


@functools.cache
def sandbox_available() -> tuple[bool, str]:
    """(True, the isolation layers) where the sandbox works here, else (False, why not). Runs a probe once per
    process: the sandboxed code must fail to reach a port this process listens on."""
    if sys.platform != "linux":
        return False, f"the sandbox needs Linux (namespaces, seccomp); this is {sys.platform}"
    with socket.create_server(("127.0.0.1", 0)) as server:
        try:
            result = execute(NETWORK_PROBE.format(port=server.getsockname()[1]))
        except SandboxError as error:
            return False, str(error)
    if not result.passed:
        return False, f"the network probe failed: {(result.stderr or result.stdout).strip()}"
    return True, " + ".join(result.isolation)


# ------------------------------------------------------------------------------------------ the child side

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x40000000, 0x00010000  # <linux/sched.h>
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2  # <linux/prctl.h>, <linux/seccomp.h>


def check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def new_network_namespace() -> str:
    """Move this process into a new network namespace: no interface but a loopback that is down. Inside a new user
    namespace if allowed (it drops our capabilities on the host too), else alone (needs CAP_SYS_ADMIN)."""
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "user+network namespace"
    user_error = os.strerror(ctypes.get_errno())
    if libc.unshare(CLONE_NEWNET) == 0:
        return "network namespace"
    raise OSError(ctypes.get_errno(), f"unshare: {user_error} (user+network), "
                                      f"{os.strerror(ctypes.get_errno())} (network)")


def set_limits(limits: Limits) -> None:
    """Hard limits equal to the soft ones: the code cannot raise them (without CAP_SYS_RESOURCE on the host)."""
    cpu_seconds = int(limits.timeout) + 1  # a backstop to the wall clock: a busy loop dies even if we did not
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, limits.processes),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


# seccomp-BPF (<linux/filter.h>, <linux/seccomp.h>): a program over struct seccomp_data {int nr; u32 arch;
# u64 instruction_pointer; u64 args[6]}, run at every system call; its return value decides.
LOAD = 0x20  # BPF_LD | BPF_W | BPF_ABS: load the 32-bit word at offset k
JEQ, JGE, JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_JEQ / BPF_JGE / BPF_JSET | BPF_K: jump jt if true, else jf
RET = 0x06  # BPF_RET | BPF_K
NR_OFFSET, ARCH_OFFSET, ARG0_OFFSET = 0, 4, 16  # args[0]'s low 32 bits (both architectures are little-endian)
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000  # ERRNO | errno: fail the call with errno
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers
SYSCALLS = {  # the audit architecture and the system call numbers we filter, per machine (asm/unistd*.h)
    "x86_64": {"arch": 0xC000003E, "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "ptrace": 101,
               "io_uring_setup": 425, "clone3": 435},
    "aarch64": {"arch": 0xC00000B7, "socket": 198, "clone": 220, "ptrace": 117, "io_uring_setup": 425,
                "clone3": 435},  # aarch64 has no fork or vfork: libc makes them with clone
}


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: no sockets but AF_UNIX, no new processes (threads are
    fine), no ptrace, no io_uring; everything else allowed. Another architecture's calls kill the process."""
    numbers = SYSCALLS[machine]
    program = [(LOAD, 0, 0, ARCH_OFFSET), (JEQ, 1, 0, numbers["arch"]), (RET, 0, 0, KILL_PROCESS),
               (LOAD, 0, 0, NR_OFFSET)]
    if machine == "x86_64":
        program += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, ERRNO | errno.ENOSYS)]
    refused = [("fork", errno.EPERM), ("vfork", errno.EPERM), ("ptrace", errno.EPERM),
               ("io_uring_setup", errno.EPERM), ("clone3", errno.ENOSYS)]  # ENOSYS: libc falls back to clone
    for name, error in refused:
        if name in numbers:
            program += [(JEQ, 0, 1, numbers[name]), (RET, 0, 0, ERRNO | error)]
    program += [(JEQ, 0, 4, numbers["socket"]), (LOAD, 0, 0, ARG0_OFFSET),  # socket(domain, ...)
                (JEQ, 0, 1, socket.AF_UNIX), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | errno.EACCES)]
    program += [(JEQ, 0, 4, numbers["clone"]), (LOAD, 0, 0, ARG0_OFFSET),  # clone(flags, ...)
                (JSET, 0, 1, CLONE_THREAD), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | errno.EPERM)]
    return program + [(RET, 0, 0, ALLOW)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def install_filter(program: list[tuple[int, int, int, int]]) -> None:
    """Apply a seccomp-BPF program to this process and everything it will start."""
    instructions = (SockFilter * len(program))(*(SockFilter(*instruction) for instruction in program))
    # no_new_privs: required to install a filter without CAP_SYS_ADMIN; also, no setuid binary gains privileges
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(SockFprog(len(program), instructions)), 0, 0),
          "prctl(PR_SET_SECCOMP)")


def install_seccomp_filter() -> str:
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"seccomp: no filter written for {machine}")
    install_filter(seccomp_program(machine))
    return "seccomp"


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


def child_main(ack_fd: int, limits: Limits) -> None:
    """Read the code from stdin, isolate, report on ack_fd, run the code."""
    code = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code gets no input
    os.close(devnull)
    layers, problems = [], []
    try:
        layers.append(new_network_namespace())
    except OSError as error:
        problems.append(error.strerror)
    set_limits(limits)  # after unshare: in a new user namespace RLIMIT_NPROC counts the sandbox's processes only
    try:
        layers.append(install_seccomp_filter())
    except OSError as error:
        problems.append(error.strerror)
    if not layers:
        os.write(ack_fd, REFUSED + f" no kernel barrier to the network here: {'; '.join(problems)}".encode())
        sys.exit(1)
    os.write(ack_fd, ISOLATED + ",".join(layers).encode())
    os.close(ack_fd)
    disable_destructive_functions()
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    child_main(int(sys.argv[1]), Limits(**json.loads(sys.argv[2])))
