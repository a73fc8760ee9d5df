"""The sandbox for model-written code: it runs the code, and the kernel keeps it off the network, within its limits,
out of new processes and inside an empty directory that is gone afterwards."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanochat_flyte.evaluation.sandbox import Limits, execute, sandbox_available, seccomp_program

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux namespaces or seccomp")


def test_the_sandbox_works_on_this_machine():
    available, why = sandbox_available()
    assert available, why
    assert "namespace" in why or "seccomp" in why


def test_a_passing_program_and_a_failing_assertion():
    passed = execute("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert passed.passed and passed.returncode == 0 and passed.stdout == "ok\n" and not passed.timed_out
    assert passed.isolation  # at least one kernel barrier held
    failed = execute("assert 1 + 1 == 3, 'arithmetic'")
    assert not failed.passed and failed.returncode == 1
    assert "AssertionError: arithmetic" in failed.stderr
    assert not execute("def broken(:\n    pass").passed  # a syntax error fails too


def test_an_infinite_loop_is_stopped_at_the_timeout():
    start = time.monotonic()
    result = execute("while True:\n    pass", Limits(timeout=1.0))
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.monotonic() - start < 4.0  # 1 s plus the interpreter's start and the kill


def test_a_network_connection_is_refused():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        result = execute(textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3)
            except OSError as error:
                print("refused:", error)
            else:
                raise SystemExit("connected")
        """))
        assert result.passed, result.stderr
        assert result.stdout.startswith("refused:")
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the listening socket


def run_layer(code: str) -> subprocess.CompletedProcess:
    """code in a plain subprocess (no sandbox around it) that imports this worktree's sandbox module."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_network_namespace_alone_cuts_the_network():
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = run_layer(f"""
            import socket
            from nanochat_flyte.evaluation.sandbox import new_network_namespace
            print(new_network_namespace())
            print(open("/proc/self/net/dev").read().count(":"), "interfaces")
            try:
                socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=3)
            except OSError as error:
                print("refused", error.errno)
        """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] in ("user+network namespace", "network namespace")
    assert lines[1] == "1 interfaces"  # the loopback, and it is down
    assert lines[2].startswith("refused")


def test_the_seccomp_filter_alone_refuses_sockets_and_processes_but_not_threads():
    result = run_layer("""
        import os, socket, threading
        from nanochat_flyte.evaluation.sandbox import install_seccomp_filter
        install_seccomp_filter()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.socket(family, socket.SOCK_STREAM)
            except PermissionError:
                print("no socket", family.name)
        socket.socketpair(socket.AF_UNIX).__len__()  # local pipes stay allowed
        try:
            os.fork()
        except PermissionError:
            print("no fork")
        try:
            os.posix_spawn("/bin/true", ["true"], {})
        except PermissionError:
            print("no spawn")
        thread = threading.Thread(target=print, args=("thread ran",))
        thread.start()
        thread.join()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["no socket AF_INET", "no socket AF_INET6", "no fork", "no spawn",
                                          "thread ran"]


REFUSE_CALLS = """
    import errno, platform
    from nanochat_flyte.evaluation import sandbox as s
    numbers = {{"x86_64": {{"unshare": 272, "prctl": 157}},
               "aarch64": {{"unshare": 97, "prctl": 167}}}}[platform.machine()]
    program = [(s.LOAD, 0, 0, s.ARCH_OFFSET), (s.JEQ, 1, 0, s.SYSCALLS[platform.machine()]["arch"]),
               (s.RET, 0, 0, s.KILL_PROCESS), (s.LOAD, 0, 0, s.NR_OFFSET)]
    for name in {refused}:  # as a container runtime's profile would: EPERM
        program += [(s.JEQ, 0, 1, numbers[name]), (s.RET, 0, 0, s.ERRNO | errno.EPERM)]
    s.install_filter(program + [(s.RET, 0, 0, s.ALLOW)])  # inherited by the sandbox's process
    print(s.sandbox_available())
"""


@pytest.mark.parametrize("refused, available", [
    (["unshare"], "(True, 'seccomp')"),  # a container without namespaces: the filter alone holds the network
    (["prctl"], "(True, 'user+network namespace')"),  # no seccomp filter: the namespace alone
    (["unshare", "prctl"], "(False, 'no kernel barrier to the network here: unshare: Operation not permitted "
                           "(user+network), Operation not permitted (network); prctl(PR_SET_NO_NEW_PRIVS): "
                           "Operation not permitted')"),
])
def test_each_layer_alone_is_enough_and_without_both_the_code_does_not_run(refused, available):
    result = run_layer(REFUSE_CALLS.format(refused=refused))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == available


def test_the_seccomp_program_jumps_stay_inside_it():
    for machine in ("x86_64", "aarch64"):
        program = seccomp_program(machine)
        for index, (code, jt, jf, _) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump
                assert index + 1 + max(jt, jf) < len(program)
        assert program[-1] == (0x06, 0, 0, 0x7FFF0000)  # anything not refused is allowed


def test_memory_limit():
    result = execute("block = bytearray(1 << 30)", Limits(memory_bytes=256 * 2**20))
    assert not result.passed and "MemoryError" in result.stderr


def test_resource_limits_cannot_be_raised_again():
    result = execute("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    if os.geteuid() == 0 and "user+network namespace" not in result.isolation:
        pytest.skip("root outside a user namespace keeps CAP_SYS_RESOURCE")
    assert not result.passed and "ValueError" in result.stderr


def test_output_is_truncated():
    result = execute("import sys\nprint('x' * 100_000)\nprint('y' * 100_000, file=sys.stderr)",
                     Limits(output_bytes=1000))
    assert result.passed and result.truncated
    assert result.stdout == "x" * 1000 and result.stderr == "y" * 1000


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
