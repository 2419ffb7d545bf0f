"""Hostile programs, each contained: exhausting CPU, memory, processes, disk or output; outliving
the timeout; touching the host filesystem; reading secrets; reaching the network; attacking the
supervisor; and earning a pass it did not deserve. Every test asserts the containment itself (the
host file unchanged, the supervisor alive, the wall-clock bound held, no process left)."""

import os
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sandbox import Limits, Sandbox

SECRET = f"hf_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def box():
    os.environ["HF_TOKEN"] = SECRET  # the supervisor's environment holds a secret
    try:
        with Sandbox(limits=Limits(slots=2, processes=32, workdir_mb=16, output_cap=1 << 16)) as sandbox:
            yield sandbox
    finally:
        del os.environ["HF_TOKEN"]


def py(box, code, timeout_s=5.0, memory_mb=256):
    return box.run(["python3", "-c", textwrap.dedent(code)], timeout_s=timeout_s, memory_mb=memory_mb)


def host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def still_serving(box):
    assert box.run(["true"]).ok, "the supervisor must keep working after a hostile run"


def test_cpu_loop_ignoring_signals_is_killed_on_time(box):
    start = time.monotonic()
    result = py(box, """
        import signal
        for s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
    """, timeout_s=1.0)
    assert not result.ok and result.status in ("timeout", "signaled")
    assert time.monotonic() - start < 3.5 and not result.leftover_processes
    still_serving(box)


def test_memory_bomb_hits_the_memory_limit(box):
    result = py(box, """
        chunks = []
        while True:
            chunks.append(bytearray(16 << 20))  # touched pages: counted by the memory cgroup
    """, memory_mb=128)
    assert not result.ok and (result.status == "memory" or "MemoryError" in result.stderr), result
    still_serving(box)


def test_fork_bomb_is_bounded_and_leaves_nothing(box):
    marker = uuid.uuid4().hex
    result = box.run(["python3", "-c", "import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)\n",
                      marker], timeout_s=1.5)
    assert not result.ok and not result.leftover_processes
    assert host_processes_with(marker) == []
    still_serving(box)


def test_disk_is_capped_and_private(box, tmp_path):
    result = py(box, """
        import os
        try:
            with open('/work/big', 'wb') as f:
                for _ in range(64):
                    f.write(b'x' * (1 << 20))
        except OSError as exc:
            print('stopped', exc.errno)
        print(os.path.getsize('/work/big') <= 16 << 20)
    """)
    assert result.stdout.split()[0] == "stopped" and result.stdout.split()[-1] == "True"


def test_output_flood_is_cut(box):
    start = time.monotonic()
    result = py(box, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert result.status == "output_limit" and len(result.stdout) <= 1 << 16
    assert time.monotonic() - start < 3


def test_daemons_do_not_outlive_the_run(box):
    marker = uuid.uuid4().hex
    result = py(box, f"""
        import os, subprocess
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                subprocess.Popen(['sleep', '30', '{marker}'], start_new_session=True)
                os._exit(0)
            os._exit(0)
        print('parent leaves')
    """)
    assert result.ok and not result.leftover_processes
    time.sleep(0.2)
    assert host_processes_with(marker) == []


def test_runs_of_a_slot_share_nothing_through_its_network_namespace():
    """A slot's jails enter one network namespace, kept by the server (DESIGN: cheaper than one per
    run). A run that leaves a listening socket behind, held by a daemon, must not hand it to the next."""
    name = f"r1-leak-{uuid.uuid4().hex}"
    with Sandbox(limits=Limits(slots=1)) as one_slot:
        first = py(one_slot, f"""
            import os, socket, time
            s = socket.socket(socket.AF_UNIX)
            s.bind('\\0{name}')
            s.listen()
            if os.fork() == 0:
                os.setsid()
                time.sleep(30)
            print(open('/proc/net/unix').read().count('{name}'), os.readlink('/proc/self/ns/net'))
        """)
        second = py(one_slot, f"""
            import socket
            print(open('/proc/net/unix').read().count('{name}'))
            try:
                socket.socket(socket.AF_UNIX).connect('\\0{name}')
                print('CONNECTED')
            except OSError as exc:
                print('no', exc.errno)
        """)
    count, namespace = first.stdout.split()
    assert first.ok and count == "1" and namespace != os.readlink("/proc/self/ns/net"), first.stderr
    assert second.ok and second.stdout.split()[0] == "0" and "CONNECTED" not in second.stdout


def test_jails_die_with_their_server():
    """The server is the jails' parent (no monitor in between): killing it must end them."""
    marker = uuid.uuid4().hex
    sandbox = Sandbox(limits=Limits(slots=1))
    groups = [Path(f"/sys/fs/cgroup/{h}/r1sandbox/{sandbox._process.pid}-0") for h in ("memory", "pids")]
    groups = [g for g in groups if g.is_dir()]  # as root: the slot's cgroups, which hold every jail process

    def alive() -> bool:
        return bool(host_processes_with(marker) or any((g / "cgroup.procs").read_text().split() for g in groups))

    try:
        sandbox.submit({"kind": "exec", "argv": ["python3", "-c", f"import time; time.sleep(30)  # {marker}"],
                        "timeout_s": 30.0, "memory_mb": 256})
        deadline = time.monotonic() + 10
        while not host_processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_processes_with(marker)
        sandbox._process.kill()
        sandbox._process.wait()
        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive()
    finally:
        sandbox.close()
    for group in groups:  # the killed server could not remove them
        group.rmdir()


def test_host_filesystem_is_out_of_reach(box, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    result = py(box, f"""
        import os, sys
        for path in ({str(victim)!r}, '/etc/passwd', '/etc/shadow', '/root/.bashrc', {str(Path(__file__))!r}):
            try:
                open(path, 'a').write('pwned')
                print('WROTE', path)
            except OSError as exc:
                print('no', exc.errno)
        for path in ('/usr/lib/evil.pth', os.path.join(sys.prefix, 'lib', 'evil.py'), '/evil'):
            try:
                open(path, 'w').write('import os')
                print('WROTE', path)
            except OSError as exc:
                print('no', exc.errno)
    """)
    assert result.ok and "WROTE" not in result.stdout, result.stdout
    assert victim.read_text() == "original" and "pwned" not in Path(__file__).read_text()[-200:]


def test_secrets_stay_outside(box):
    result = py(box, """
        import os, glob
        seen = dict(os.environ)
        for path in glob.glob('/proc/*/environ'):
            try:
                seen[path] = open(path).read()
            except OSError:
                pass
        print(seen)
    """)
    assert result.ok and SECRET not in result.stdout and "HF_TOKEN" not in result.stdout


def test_no_network(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    result = py(box, f"""
        import socket
        for family, kind, address in ((socket.AF_INET, socket.SOCK_STREAM, ('127.0.0.1', {port})),
                                      (socket.AF_INET, socket.SOCK_DGRAM, ('8.8.8.8', 53)),
                                      (socket.AF_INET6, socket.SOCK_STREAM, ('::1', {port}))):
            try:
                s = socket.socket(family, kind)
                s.connect(address)
                s.send(b'x')
                print('CONNECTED', address)
            except OSError as exc:
                print('no', exc.errno)
    """)
    assert result.ok and "CONNECTED" not in result.stdout, result.stdout
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()


def test_supervisor_cannot_be_killed_or_traced(box):
    me = os.getpid()
    result = py(box, f"""
        import ctypes, os, signal
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in ({me}, {box._process.pid}, os.getppid(), -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as exc:
                print('kill', exc.errno)
        print('ptrace', libc.ptrace(16, {me}, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH
        print('unshare', libc.unshare(0x10000000), 'mount', libc.mount(b'none', b'/', None, 32, None))
    """)
    assert box._process.poll() is None
    assert "ptrace -1" in result.stdout and "unshare -1 mount -1" in result.stdout
    still_serving(box)


ADD_TESTS = [{"input": [123456789, 1], "output": 123456790}, {"input": [2, 2], "output": 4}]


@pytest.mark.parametrize("name, solution", [
    ("always-equal object", "class Eq:\n    def __eq__(self, other): return True\ndef add(a, b):\n    return Eq()\n"),
    ("exit before the tests", "import sys\nsys.exit(0)\n"),
    ("hard exit before the tests", "import os\nos._exit(0)\n"),
    ("forged verdict lines", "import os\nos.write(3, b'{\"i\": 0, \"value\": 1}\\n{\"i\": 1, \"value\": 4}\\n')\n"
                             "def add(a, b):\n    return 0\n"),
    ("search the heap for the expected value", "import gc\ndef add(a, b):\n"
                                               "    return next((o for o in gc.get_objects() if o == 123456790), -1)\n"),
    ("patch the harness", "import json\njson.dumps = lambda *a, **k: '{\"i\": 0, \"value\": 123456790}'\n"
                          "def add(a, b):\n    return None\n"),
])
def test_unearned_passes_are_refused(box, name, solution):
    result = box.grade({"format": "function_call", "solution": solution, "entry_point": "add", "tests": ADD_TESTS})
    assert not result.passed, name


def test_forged_check_report_does_not_pass_literal_asserts(box):
    forged = "import os\nos.write(3, b'{\"check\": \"completed\"}\\n')\nos._exit(0)\n"
    result = box.grade({"format": "assert", "prompt": "", "solution": forged, "entry_point": "f",
                        "test_code": "def check(candidate):\n    assert candidate(1) == 2\n"})
    assert not result.passed
