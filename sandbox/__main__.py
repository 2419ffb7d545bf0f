"""python -m sandbox run [--timeout S] [--memory MB] [--workdir DIR] -- PROGRAM [ARGS...]
python -m sandbox grade PROBLEM.json
python -m sandbox detect"""

import argparse
import json
import sys

from sandbox.client import Limits, Sandbox, SandboxUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description="Run or grade untrusted code, isolated.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run PROGRAM isolated; exit status 0 iff it exited 0")
    run.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wall-clock limit (seconds)")
    run.add_argument("--memory", type=int, default=512, metavar="MB", help="memory limit")
    run.add_argument("--workdir", metavar="DIR", help="copied into the private work directory (nothing is written back)")
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    grade = commands.add_parser("grade", help="grade PROBLEM.json; prints one JSON line with 'passed'")
    grade.add_argument("problem", help="path to a problem JSON file (DESIGN.md contract 3)")
    commands.add_parser("detect", help="print the isolation mechanisms found and the level used")
    args = parser.parse_args(argv)

    if args.command == "run":
        program = args.program[1:] if args.program[:1] == ["--"] else args.program
        if not program:
            parser.error("run: give the program after --, e.g. `python -m sandbox run -- python3 -c 'print(1)'`")
        if args.timeout <= 0 or args.memory <= 0:
            parser.error(f"--timeout {args.timeout} and --memory {args.memory} must be positive")
    if args.command == "grade":
        try:
            with open(args.problem) as f:
                problem = json.load(f)
        except (OSError, ValueError) as exc:
            parser.error(f"grade: cannot read {args.problem!r}: {exc}")
    try:
        sandbox = Sandbox(limits=Limits(slots=1))
    except SandboxUnavailable as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 3
    with sandbox:
        if args.command == "detect":
            print(json.dumps({"level": sandbox.level, "mechanisms": sandbox.mechanisms, "failures": sandbox.failures}))
            return 0
        if args.command == "grade":
            try:
                result = sandbox.grade(problem)
            except ValueError as exc:
                parser.error(f"grade: {args.problem}: {exc}")
            print(result.to_json())
            return 0 if result.passed else 1
        stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        result = sandbox.run(program, timeout_s=args.timeout, memory_mb=args.memory, workdir=args.workdir, stdin=stdin)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.ok:
        return 0
    if result.status != "exited" or not result.exit_code:
        print(f"sandbox: {result.status}" + (f": {result.error}" if result.error else ""), file=sys.stderr)
    return result.exit_code if result.status == "exited" and result.exit_code else 124 if result.status == "timeout" else 1


if __name__ == "__main__":
    sys.exit(main())
