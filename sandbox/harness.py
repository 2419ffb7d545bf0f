"""What runs inside the jail for a grading: execute the solution, feed it the tests' inputs, and
write what it produced to the result pipe, one JSON line per test. Expected outputs never get here;
the supervisor compares (sandbox/grading.py).

- function_call: the solution runs in this process and reports its return values (sandbox/values.py:
  exact builtin types only, so an always-equal object cannot be reported).
- stdio: each test in its own child process, stdin from a file, stdout to a file.
- assert: two processes. The candidate (a child, in a nested Landlock domain that cannot signal or
  trace its parent) loads the solution and answers calls over a pipe with encoded values. The checker
  (this process: fresh globals, pristine builtins, not dumpable, so its memory and fds are out of the
  candidate's reach) runs the test code with a proxy for the candidate that hands back decoded
  builtins, and reports the asserts' hole values (sandbox/asserts.py). The candidate never holds the
  result pipe or the test code."""

import builtins
import json
import os
import select
import signal
import sys
import traceback

from sandbox import linux, values
from sandbox.jail import CHECK_FD, DEVICES, RESULT_FD

OUTPUT_CAP = 1 << 20  # bytes of stdout kept per stdio test
REPLY_CAP = 16 << 20  # bytes of one encoded return value from the candidate


def send(fd: int, record: dict) -> None:
    """One JSON line, whole, to a pipe."""
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def emit(record: dict) -> None:
    send(RESULT_FD, record)


def emit_value(index: int, thunk) -> None:
    try:
        emit({"i": index, "value": values.encode(thunk())})
    except BaseException as exc:  # a failing test is data, whatever the solution raised
        emit({"i": index, "error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]


def main(request: dict, landlock_abi: int = 0) -> None:
    if request["format"] == "assert":
        _assert(request, landlock_abi)
        return
    os.close(CHECK_FD)
    try:
        code = compile(request["source"], "<solution>", "exec")
    except BaseException as exc:
        emit({"load_error": _describe(exc)})
        return
    if request["format"] == "stdio":
        _stdio(code, request)
        return
    namespace = {"__name__": "__solution__"}
    try:
        exec(code, namespace)
    except BaseException as exc:
        emit({"load_error": _describe(exc)})
        return
    candidate = namespace.get(request["entry_point"])
    for i, args in enumerate(request["inputs"]):
        emit_value(i, lambda: candidate(*args))


# --- assert format: checker and candidate -----------------------------------------------------------

def _assert(request: dict, landlock_abi: int) -> None:
    if request.get("checker") == "shared":
        _assert_shared(request)
        return
    # Not dumpable before the fork: /proc/<checker>/{mem,fd,...} and ptrace then need a capability
    # nobody in the jail has, even before the check code is read.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (RESULT_FD, CHECK_FD, calls_w, replies_r):
                os.close(fd)
            if landlock_abi >= 6:  # a nested domain: no signals to, nor tracing of, the checker
                linux.landlock_restrict(["/"], [os.getcwd()], [f"/dev/{d}" for d in DEVICES], landlock_abi)
            _serve_candidate(request, calls_r, replies_w)
        finally:
            os._exit(0)
    os.close(calls_r)
    os.close(replies_w)
    check = json.loads(_read_all(CHECK_FD))
    os.close(CHECK_FD)
    proxy = _Candidate(calls_w, replies_r)
    try:
        ready = proxy.receive()
    except (RuntimeError, ValueError) as exc:
        ready = {"load_error": f"the candidate did not start: {exc}"}
    if "load_error" in ready or "ready" not in ready:
        emit({"load_error": str(ready.get("load_error", "the candidate did not start"))[:2000]})
        return
    namespace = {"__name__": "__check__"}
    if check.get("prompt"):  # its helpers (HumanEval's poly, encode_cyclic...), not the candidate's
        try:
            exec(compile(check["prompt"], "<prompt>", "exec"), namespace)
        except BaseException:
            pass
    namespace[request["entry_point"]] = proxy
    _run_check(check["check_code"], namespace, proxy)


def _run_check(check_code: str, namespace: dict, candidate) -> None:
    """`check(candidate)` in `namespace`; its asserts report through __r1_emit (asserts.py)."""
    namespace["__r1_emit"] = emit_value
    try:
        exec(compile(check_code, "<tests>", "exec"), namespace)
        namespace["check"](candidate)
    except BaseException as exc:
        emit({"check": "failed", "error": _describe(exc)})
        return
    emit({"check": "completed"})


def _load(source: str, entry_point: str):
    """The solution's entry point, from a fresh module namespace."""
    namespace = {"__name__": "__solution__"}
    exec(compile(source, "<solution>", "exec"), namespace)
    return namespace[entry_point]


def _assert_shared(request: dict) -> None:
    """Test code that only calls the candidate on literal arguments (asserts.rewrite_check): it may
    run in the candidate's process, as every value it reports is the candidate's to choose anyway."""
    check = json.loads(_read_all(CHECK_FD))
    os.close(CHECK_FD)
    try:
        candidate = _load(request["source"], request["entry_point"])
    except BaseException as exc:
        emit({"load_error": _describe(exc)})
        return
    _run_check(check["check_code"], {"__name__": "__check__", request["entry_point"]: candidate}, candidate)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class _Candidate:
    """The checker's handle on the candidate: each call crosses the pipe as encoded values."""

    def __init__(self, calls_fd: int, replies_fd: int):
        self.calls_fd, self.replies = calls_fd, os.fdopen(replies_fd, "rb")

    def receive(self) -> dict:
        line = self.replies.readline(REPLY_CAP + 1)
        if not line.endswith(b"\n"):
            raise RuntimeError("the candidate exited" if not line else "reply over the size limit")
        reply = values.loads(line)
        if type(reply) is not dict:
            raise ValueError("malformed reply from the candidate")
        return reply

    def __call__(self, *args, **kwargs):
        send(self.calls_fd, {"args": values.encode(list(args)), "kwargs": values.encode(kwargs)})
        reply = self.receive()
        if "value" in reply:
            return values.decode(reply["value"])
        kind = getattr(builtins, str(reply.get("type")), None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(str(reply.get("error", ""))[:2000])
        raise RuntimeError(str(reply.get("error", "malformed reply"))[:2000])


def _serve_candidate(request: dict, calls_fd: int, replies_fd: int) -> None:
    try:
        candidate = _load(request["source"], request["entry_point"])
    except BaseException as exc:
        send(replies_fd, {"load_error": _describe(exc)})
        return
    send(replies_fd, {"ready": True})
    calls = os.fdopen(calls_fd, "rb")
    for line in calls:
        try:
            call = json.loads(line)
            value = values.encode(candidate(*values.decode(call["args"]), **values.decode(call["kwargs"])))
        except BaseException as exc:
            send(replies_fd, {"error": _describe(exc), "type": type(exc).__name__})
            continue
        send(replies_fd, {"value": value})


# --- stdio format -------------------------------------------------------------------------------------

def _stdio(code, request: dict) -> None:
    """Each test in its own process: stdin from a file, stdout to a file (RLIMIT_FSIZE caps it)."""
    for i, text in enumerate(request["inputs"]):
        with open(f"stdin-{i}", "w") as f:
            f.write(text)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_stdio_child(code, i)
        pidfd = os.pidfd_open(pid)
        timed_out = not select.select([pidfd], [], [], request["timeout_s"])[0]
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        if os.getpid() == 1:  # pid 1 of the jail: end whatever the test left behind, then reap it
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
        with open(f"stdout-{i}", "rb") as f:
            out = f.read(OUTPUT_CAP + 1)
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        emit({"i": i, "stdout": out[:OUTPUT_CAP].decode("utf-8", "replace"), "exit": exit_code,
              "timeout": timed_out, "truncated": len(out) > OUTPUT_CAP})


def _run_stdio_child(code, i: int) -> None:
    exit_code = 0
    try:
        os.setpgid(0, 0)
        os.dup2(os.open(f"stdin-{i}", os.O_RDONLY), 0)
        os.dup2(os.open(f"stdout-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        os.close(RESULT_FD)
        exec(code, {"__name__": "__main__"})
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    try:
        sys.stdout.flush()
    except BaseException:
        exit_code = exit_code or 1
    os._exit(exit_code & 0xFF)
