"""What runs inside the jail for a grading: execute the solution, feed it the tests' inputs, and
write what it produced to the result pipe, one JSON line per test. Expected outputs never get here;
the supervisor compares (sandbox/grading.py).

Values cross as type-tagged JSON built only from exact builtin types (`type(x) is int`, ...), so an
object whose `__eq__` always succeeds cannot even be reported, let alone compared."""

import json
import os
import select
import signal
import sys
import traceback

from sandbox.jail import RESULT_FD

OUTPUT_CAP = 1 << 20  # bytes of stdout kept per stdio test


def encode(value, depth: int = 0):
    if depth > 100:
        raise ValueError("value nested deeper than 100 levels")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if value == value and abs(value) != float("inf") else {"float": repr(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"tuple": [encode(v, depth + 1) for v in value]}
    if kind in (set, frozenset):
        return {"set": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    raise TypeError(f"cannot report a value of type {kind.__name__}; return builtin types only")


def emit(record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(RESULT_FD, data):]


def emit_value(index: int, thunk) -> None:
    try:
        emit({"i": index, "value": encode(thunk())})
    except BaseException as exc:  # a failing test is data, whatever the solution raised
        emit({"i": index, "error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]


def main(request: dict) -> None:
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
    if request["format"] == "function_call":
        for i, args in enumerate(request["inputs"]):
            emit_value(i, lambda: candidate(*args))
        return
    namespace["__r1_emit"] = emit_value
    try:
        exec(compile(request["check_code"], "<tests>", "exec"), namespace)
        namespace["check"](candidate)
    except BaseException as exc:
        emit({"check": "failed", "error": _describe(exc)})
        return
    emit({"check": "completed"})


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
            out = f.read(OUTPUT_CAP)
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        emit({"i": i, "stdout": out.decode("utf-8", "replace"), "exit": exit_code, "timeout": timed_out})


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
