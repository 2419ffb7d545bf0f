"""A grade must mean that *this* program solved *this* problem, and grading must never hang or crash
the trainer. Hostile completions, each written from a class of attack on the grader (issue 12):
reading a sibling completion's code, inputs or results (over gc and over the raw heap), forging an
assert-format verdict, deadlocking the client, crashing the scorer with crafted values, exhausting
the server's file descriptors, and killing the server."""

import gc
import glob
import json
import os
import resource
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

import rewards.code
from sandbox import Limits, Sandbox, SandboxUnavailable
from sandbox.grading import json_equal

ROUNDS = 5  # each attack runs in several interleaved batches, to catch races with the server's reads


@pytest.fixture(scope="module")
def box():
    with Sandbox(limits=Limits(slots=4)) as sandbox:
        yield sandbox


# --- another completion's code, inputs and results -------------------------------------------------

# Finds marker strings anywhere in this process: in objects reachable through gc, and in the raw bytes
# of every readable mapping (freed heap included). Its own marker proves the search works.
SEARCH = textwrap.dedent(r'''
    import ctypes, gc, re
    def _r1_found(own):
        seen = set()
        pattern = re.compile(rb"SIBLING-[0-9a-f]{32}|" + own.encode())
        for obj in gc.get_objects():
            items = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
            for item in items:
                if isinstance(item, str):
                    seen.update(m.decode() for m in pattern.findall(item.encode("utf-8", "replace")))
        with open("/proc/self/maps") as maps:  # the heap and every anonymous mapping, byte by byte
            regions = [line.split() for line in maps]
        for fields in regions:
            if fields[1][0] != "r" or (len(fields) > 5 and fields[5] not in ("[heap]", "[stack]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            seen.update(m.decode() for m in pattern.findall(ctypes.string_at(start, end - start)))
        return [own in seen, any(s.startswith("SIBLING-") for s in seen)]
''')


def sibling_problems(fmt: str) -> list[dict]:
    """Siblings (a right answer, carrying a marker in their code, inputs and expected output) and
    probes that pass only if their search works and finds no sibling: [found own, found sibling]."""
    problems = []
    for k in range(8):
        mark = f"SIBLING-{uuid.uuid4().hex}"
        own = f"OWN-{uuid.uuid4().hex}"
        if k % 2 == 0:
            if fmt == "function_call":
                problems.append({"format": fmt, "entry_point": "f", "solution": f"def f(x):\n    return x  # {mark}\n",
                                 "tests": [{"input": [mark], "output": mark}]})
            elif fmt == "stdio":
                problems.append({"format": fmt, "solution": f"print(input())  # {mark}\n",
                                 "tests": [{"input": mark + "\n", "output": mark + "\n"}]})
            else:
                problems.append({"format": fmt, "entry_point": "f", "prompt": "",
                                 "solution": f"def f(x):\n    return x  # {mark}\n",
                                 "test_code": f"def check(candidate):\n    assert candidate('{mark}') == '{mark}'\n"})
            continue
        source = SEARCH + f"# {own}\n"
        if fmt == "function_call":
            problems.append({"format": fmt, "entry_point": "f", "solution": source + f"def f():\n    return _r1_found('{own}')\n",
                             "tests": [{"input": [], "output": [True, False]}]})
        elif fmt == "stdio":
            problems.append({"format": fmt, "solution": source + f"print(*_r1_found('{own}'))\n",
                             "tests": [{"input": "", "output": "True False\n"}]})
        else:
            problems.append({"format": fmt, "entry_point": "f", "prompt": "",
                             "solution": source + f"def f():\n    return _r1_found('{own}')\n",
                             "test_code": "def check(candidate):\n    assert candidate() == [True, False]\n"})
    return problems


@pytest.mark.parametrize("fmt", ["function_call", "stdio", "assert"])
def test_a_completion_cannot_read_another_completions_code_inputs_or_results(box, fmt):
    for _ in range(ROUNDS):
        problems = sibling_problems(fmt)
        results = box.grade_many(problems)
        for k, result in enumerate(results):
            assert result.passed, (fmt, k, result.tests, result.error)


def test_the_candidate_cannot_read_the_test_code_or_reach_the_checker(box):
    """Assert format: the test code (here a secret literal that a residual assert compares) lives in
    the checker process only; the candidate cannot find it, trace, signal or read the checker."""
    own = f"OWN-{uuid.uuid4().hex}"
    secret = uuid.uuid4().hex
    solution = SEARCH.replace("SIBLING-", "SECRET-") + f"# {own}\n" + textwrap.dedent(f'''
        import os, signal
        def f():
            attempts = []
            for path in ("/proc/1/mem", "/proc/1/environ", "/proc/1/fd/6", "/proc/1/fd/3"):
                try:
                    open(path, "rb").read(16)
                    attempts.append(path)
                except OSError:
                    pass
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                try:
                    os.kill(os.getppid(), sig)
                    attempts.append(sig)
                except OSError:
                    pass
            return [*_r1_found('{own}'), attempts]
    ''')
    test_code = (f"def check(candidate):\n    try:\n        assert candidate() == [True, False, []], 'SECRET-{secret}'\n"
                 "    except ZeroDivisionError:\n        pass\n")
    for _ in range(ROUNDS):
        result = box.grade({"format": "assert", "entry_point": "f", "prompt": "", "solution": solution,
                            "test_code": test_code})
        assert result.passed and result.checker_asserts == 1, (result.tests, result.error)


# --- assert-format verdicts ------------------------------------------------------------------------

ISCLOSE = "import math\ndef check(candidate):\n    assert abs(candidate(1) - 2) < 1e-9\n" \
          "    assert math.isclose(candidate(2), 3)\n    assert candidate([2, 1]) == sorted([3, 2])\n"


@pytest.mark.parametrize("name, solution", [
    ("writes the completed record to the result fd, then leaves",
     "import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'{\"check\": \"completed\"}\\n')\n"
     "    except OSError:\n        pass\nos._exit(0)\n"),
    ("shadows abs, sorted and math.isclose in the globals the test code would share",
     "import builtins, math\nabs = builtins.abs = lambda x: 0\nmath.isclose = lambda *a, **k: True\n"
     "sorted = builtins.sorted = lambda x: 100\ndef f(x):\n    return 100\n"),
    ("returns an always-equal object",
     "class Eq:\n    def __eq__(self, other): return True\n    def __sub__(self, other): return 0\n"
     "    def __float__(self): return 3.0\ndef f(x):\n    return Eq()\n"),
    ("exits before the test code runs", "import os\nos._exit(0)\n"),
])
def test_assert_verdicts_cannot_be_forged(box, name, solution):
    result = box.grade({"format": "assert", "entry_point": "f", "prompt": "", "solution": solution,
                        "test_code": ISCLOSE})
    assert not result.passed, name
    honest = box.grade({"format": "assert", "entry_point": "f", "prompt": "",
                        "solution": "def f(x):\n    return x + 1 if isinstance(x, int) else [2, 3]\n",
                        "test_code": ISCLOSE})
    assert honest.passed, honest.tests


# --- never hang, never crash -----------------------------------------------------------------------

def finishes_within(seconds: float, work):
    """Run `work` in a thread; fail (instead of hanging the test run) if it does not finish."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return out["value"]


def test_a_batch_of_large_inputs_and_large_prints_completes(box):
    """64 problems with ~20 KB of input whose programs print ~70 KB: the client must never hold a lock
    across a pipe write while the server blocks writing replies."""
    source = "import sys\ndata = sys.stdin.read()\nsys.stdout.write(data * 3 + 'x' * 10000)\n"
    problems = []
    for k in range(64):
        text = f"{k}:" + "y" * 20000 + "\n"
        problems.append({"format": "stdio", "solution": source, "tests": [{"input": text, "output": text * 3 + "x" * 10000}]})
    results = finishes_within(300, lambda: box.grade_many(problems))
    assert all(r.passed for r in results), [r.tests[0].detail[:100] for r in results if not r.passed][:3]


FORGED_LINES = [
    b'{"i": 0, "value": {"complex": 5}}',
    b'{"i": 0, "value": {"complex": [1]}}',
    b'{"i": 0, "value": {"dict": [[[1, 2], 3]]}}',
    b'{"i": 0, "value": {"set": [[1]]}}',
    b'{"i": 0, "value": {"float": 5}}',
    b'{"i": 0, "value": {"bytes": "zz"}}',
    b'{"i": 0, "value": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    b'{"i": 0, "error": {"x": [1]}}',
    b'{"load_error": 5}',
    b'{"check": [1]}',
    b"[1, 2]",
    b"\xff\xfe not json",
]
NEWLINE = b"\n"


@pytest.mark.parametrize("fmt", ["function_call", "assert", "stdio"])
def test_crafted_values_give_a_failed_grade_never_an_exception(box, fmt):
    returns = ["{b'a': 1}", "{(1, 2): 3}", "eval('[' * 5000 + ']' * 5000)", "2 ** 100000", "1000000006.0"]
    forge = "import os\n" + "".join(f"os.write(3, {line + NEWLINE!r})\n" for line in FORGED_LINES)
    solutions = [f"def f(*a):\n    return {r}\n" for r in returns] + [forge + "def f(*a):\n    return 1\n"]
    problems = []
    for solution in solutions:
        if fmt == "function_call":
            problems.append({"format": fmt, "entry_point": "f", "solution": solution,
                             "tests": [{"input": [], "output": 1000000007}, {"input": [1], "output": {"a": 1}}]})
        elif fmt == "assert":
            problems.append({"format": fmt, "entry_point": "f", "prompt": "", "solution": solution,
                             "test_code": "def check(candidate):\n    assert candidate() == 1000000007\n"
                                          "    assert abs(candidate(1) - 5) < 1\n"})
        else:
            problems.append({"format": fmt, "solution": solution + "print(f())\n",
                             "tests": [{"input": "", "output": "1000000007\n"}]})
    results = box.grade_many(problems)
    assert [r.passed for r in results] == [False] * len(problems), [(r.status, r.error) for r in results]
    completions = [[{"role": "assistant", "content": f"```python\n{p['solution']}```"}] for p in problems]
    columns = {key: [p.get(key) for p in problems] for key in ("format", "entry_point")}
    columns["tests"] = [json.dumps(p.get("tests", [])) for p in problems]
    columns["test_code"] = [p.get("test_code") for p in problems]
    assert rewards.code.code_reward([None] * len(problems), completions, **columns) == [0.0] * len(problems)


def test_integer_answers_are_exact():
    assert not json_equal(1000000006.0, 1000000007) and json_equal(7.0, 7) and json_equal(7, 7)
    assert json_equal(0.1 + 0.2, 0.3) and not json_equal(True, 1)


def test_stdout_is_compared_whole(box):
    problem = {"format": "stdio", "tests": [{"input": "", "output": "1\n"}]}
    assert box.grade({**problem, "solution": "print('1 \\t')\n"}).passed
    assert not box.grade({**problem, "solution": "print('1\\u3000')\n"}).passed
    cut = box.grade({**problem, "solution": "print('1')\nprint('2' * (2 << 20))\n"})
    assert not cut.passed


def test_bad_limits_are_rejected_before_any_work(box):
    problem = {"format": "function_call", "entry_point": "f", "solution": "def f():\n    return 1\n",
               "tests": [{"input": [], "output": 1}]}
    for bad in ({"timeout_s": float("nan")}, {"timeout_s": -1}, {"timeout_s": float("inf")}, {"memory_mb": 0},
                {"memory_mb": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            box.grade({**problem, **bad})
    with pytest.raises(ValueError, match="timeout_s"):
        box.run(["true"], timeout_s=float("nan"))
    assert box.grade(problem).passed


def server_fds(box) -> int:
    return len(os.listdir(f"/proc/{box._process.pid}/fd"))


def test_failed_starts_leak_nothing_and_say_why():
    """Descriptors running out in the server: every job gets a grade that names the reason (not a
    silent 0), nothing leaks, and the server serves again once descriptors are back."""
    problem = {"format": "function_call", "entry_point": "f", "solution": "def f():\n    return 1\n",
               "tests": [{"input": [], "output": 1}]}
    with Sandbox(limits=Limits(slots=2)) as sandbox:
        pid = sandbox._process.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        assert soft == hard, "the server raises its own soft limit"
        assert sandbox.grade(problem).passed
        before = server_fds(sandbox)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (before + 2, hard))
        starved = sandbox.grade_many([problem] * 6)
        assert not any(r.passed for r in starved)
        assert all("Too many open files" in (r.error or "") for r in starved), [r.error for r in starved]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert all(r.passed for r in sandbox.grade_many([problem] * 6))
        assert server_fds(sandbox) == before
    assert Limits().slots <= 64


def test_malformed_requests_do_not_stop_the_server(box):
    for garbage in (b"not json\n", b"[1, 2]\n", b'{"id": "x"}\n', b'{"id": "y", "kind": "harness", "timeout_s": NaN, '
                    b'"memory_mb": 64, "request": {"format": "stdio"}}\n', b'{"id": 5}\n'):
        box._connection.outgoing.put(garbage)
    assert box.run(["true"]).ok


def test_a_dead_server_fails_its_jobs_and_is_started_again():
    problem = {"format": "function_call", "entry_point": "f", "solution": "import time\ndef f():\n    time.sleep(2)\n"
               "    return 1\n", "tests": [{"input": [], "output": 1}], "timeout_s": 10}
    with Sandbox(limits=Limits(slots=2)) as sandbox:
        killer = threading.Timer(0.5, lambda: os.kill(sandbox._process.pid, 9))
        killer.start()
        results = finishes_within(60, lambda: sandbox.grade_many([problem] * 4))
        assert not any(r.passed for r in results) and all(r.status == "sandbox_error" for r in results)
        assert "exited" in results[0].error
        fast = {**problem, "solution": "def f():\n    return 1\n"}
        assert finishes_within(60, lambda: sandbox.grade(fast)).passed and sandbox.restarts == 1


def test_the_server_outlives_the_thread_that_started_it():
    """Its parent-death signal follows the Sandbox's own writer thread, not the caller's thread."""
    made = {}
    thread = threading.Thread(target=lambda: made.setdefault("box", Sandbox(limits=Limits(slots=1))))
    thread.start()
    thread.join()
    sandbox = made["box"]
    try:
        time.sleep(0.3)
        assert sandbox._process.poll() is None
        assert sandbox.run(["true"]).ok and sandbox.restarts == 0
    finally:
        sandbox.close()
    gc.collect()


# --- fail closed, and say so ----------------------------------------------------------------------

def test_the_level_says_what_is_in_force():
    """Without Landlock (or seccomp, or cgroups) the level is not "full", and the default refuses."""
    with pytest.raises(SandboxUnavailable, match="Landlock"):
        Sandbox(limits=Limits(slots=1), disable=("landlock",))
    with Sandbox(accept="namespaces", limits=Limits(slots=1), disable=("landlock",)) as weaker:
        assert weaker.level == "namespaces" and "Landlock" in weaker.failures["full"]
        assert weaker.mechanisms["landlock_abi"] == 0 and weaker.run(["true"]).ok


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs below /usr/local")
def test_the_root_is_read_only_all_the_way_down(tmp_path):
    """A mount below /usr (here a tmpfs at /usr/local/r1-<id>) must be read-only in the jail too,
    with Landlock off so that only the mount layer stands in the way."""
    below = f"/usr/local/r1-{uuid.uuid4().hex[:8]}"
    os.mkdir(below)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=777", "tmpfs", below], check=True)
        with Sandbox(accept="namespaces", limits=Limits(slots=1), disable=("landlock",)) as box:
            result = box.run(["python3", "-c", textwrap.dedent(f"""
                try:
                    open('{below}/planted.py', 'w').write('x')
                    print('WROTE')
                except OSError as exc:
                    print('refused', exc.errno)
                for line in open('/proc/self/mountinfo'):
                    fields = line.split()
                    point, options = fields[4], fields[5].split(',')
                    if 'rw' in options and not point.startswith(('/work', '/tmp', '/proc', '/dev/')):
                        print('WRITABLE', point)
            """)])
        assert result.ok and "refused 30" in result.stdout, result.stdout + result.stderr  # EROFS
        assert "WROTE" not in result.stdout and "WRITABLE" not in result.stdout, result.stdout
    finally:
        subprocess.run(["umount", below])
        os.rmdir(below)


def test_a_killed_server_leaves_nothing_behind_for_long():
    """SIGKILL gives a server no chance to clean up: the next server removes its mount point and
    (as root) its slot cgroups."""
    roots = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "r1sandbox-root-*")))  # noqa: E731
    before = roots()
    first = Sandbox(limits=Limits(slots=1))
    pid = first._process.pid
    mine = roots() - before
    groups = [g for g in glob.glob(f"/sys/fs/cgroup/*/r1sandbox/{pid}-*")]
    assert len(mine) == 1 and (os.geteuid() != 0 or groups)
    first._process.kill()
    first._process.wait()
    first.close()
    assert all(os.path.exists(p) for p in mine)
    with Sandbox(limits=Limits(slots=1)) as second:
        assert second.run(["true"]).ok
        assert not any(os.path.exists(p) for p in mine) and not any(os.path.exists(g) for g in groups)


def test_test_code_with_state_of_its_own_runs_apart_from_the_candidate():
    """Only test code whose every reported value is a return value of the candidate (called on
    literals) may share the candidate's process; a loop variable, a helper's result or a random input
    is the test code's own state, which a candidate in the same process could forge."""
    from sandbox.asserts import rewrite_check

    shared = lambda code: rewrite_check(code, "f")[3]  # noqa: E731
    assert shared("def check(candidate):\n    assert candidate(1) == 2\n    assert not f([1, 2])\n")
    assert shared("import math\ndef check(candidate):\n    assert math.isclose(candidate(x=1.5), 2)\n")
    for code in ("def check(candidate):\n    for x, y in [(1, 2)]:\n        assert candidate(x) == y\n",
                 "def check(candidate):\n    assert candidate(1) == helper(1)\n",
                 "import random\ndef check(candidate):\n    x = random.random()\n    assert candidate(x) == x\n",
                 "def check(candidate):\n    assert candidate(sorted([2, 1])) == [1, 2]\n",
                 "def check(candidate):\n    try:\n        assert candidate(1) == 2\n    except AssertionError:\n"
                 "        pass\n"):
        assert not shared(code), code


@pytest.mark.skipif(not os.path.isfile("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
                    and not os.path.isfile("/sys/fs/cgroup/cpu.max"), reason="no cgroup cpu controller")
def test_a_run_gets_the_cpu_it_is_given_and_no_more():
    """Two busy processes for a second of wall time, in a run limited to a quarter of a core."""
    burn = textwrap.dedent("""
        import os, resource, time
        for _ in range(2):
            if os.fork() == 0:
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    pass
                os._exit(0)
        os.wait(); os.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(usage.ru_utime + usage.ru_stime)
        os.utime('/dev/null')
    """)
    with Sandbox(limits=Limits(slots=1, cpus=0.25)) as sandbox:
        assert sandbox.mechanisms["cgroup_cpu"]
        result = sandbox.run(["python3", "-c", burn], timeout_s=10)
    assert "Read-only file system" in result.stderr, result.stderr  # the host's /dev/null inode stays as it is
    assert float(result.stdout) < 0.5, result.stdout
