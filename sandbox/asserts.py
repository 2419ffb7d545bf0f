"""HumanEval-style `check(candidate)` code, split so that the supervisor decides every assert.

Each `assert <test>` of `check` (at any depth, loops and helpers included) is cut into
- holes: the parts that need the test code's own state, i.e. calls of the candidate or of helpers,
  names, subscripts (`candidate(x)`, `poly(coeffs, solution)`, a loop variable `y`);
- a predicate over the holes built only from literals, comparisons (`==`, `<`, `is`, `in`, ...),
  `not`/`and`/`or`, arithmetic and a few pure builtins (`abs`, `math.isclose`, `len`, `sorted`, ...).

In the jail, the assert becomes `__r1_emit(k, lambda: (hole_0, hole_1, ...))`: the checker process
(which the candidate cannot reach, see harness.py) reports the holes' values, as often as the assert
runs; the supervisor evaluates predicate k on each report (`holds`). So `abs(candidate(x) - 0.5) <
1e-6`, `math.isclose(...)`, `candidate(x) is True`, `not candidate(x)`, a bare `candidate(x)` and
asserts in loops are all compared here, and the literals never enter the sandbox.

Left inside (counted as `residual`): asserts within a `try` body (their AssertionError may be
meant to be caught) and asserts outside `check`. Their verdict is the checker process's own."""

from __future__ import annotations

import ast
import math

CALLS = {"abs": abs, "round": round, "len": len, "sorted": sorted, "set": set, "frozenset": frozenset,
         "list": list, "tuple": tuple, "bool": bool, "float": float, "int": int, "str": str, "sum": sum,
         "min": min, "max": max, "all": all, "any": any, "math.isclose": math.isclose, "math.fabs": math.fabs,
         "math.floor": math.floor, "math.ceil": math.ceil, "math.sqrt": math.sqrt}
BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
           ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}
HOLE = "__r1_hole_"
MAX_INT_BITS = 100_000  # arithmetic here is on values the candidate chose: keep it cheap


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


def _split(node: ast.expr, holes: list[ast.expr]) -> ast.expr:
    """`node` with every part that must be computed inside replaced by a hole name."""
    def recurse(child):
        return _split(child, holes)
    if isinstance(node, ast.Constant):
        return node
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
        return type(node)(elts=[recurse(e) for e in node.elts], ctx=ast.Load())
    if isinstance(node, ast.Dict) and None not in node.keys:
        return ast.Dict(keys=[recurse(k) for k in node.keys], values=[recurse(v) for v in node.values])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        return ast.UnaryOp(op=node.op, operand=recurse(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return ast.BinOp(left=recurse(node.left), op=node.op, right=recurse(node.right))
    if isinstance(node, ast.BoolOp):
        return ast.BoolOp(op=node.op, values=[recurse(v) for v in node.values])
    if isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
        return ast.Compare(left=recurse(node.left), ops=node.ops, comparators=[recurse(c) for c in node.comparators])
    if (isinstance(node, ast.Call) and _callee(node.func) in CALLS
            and not any(isinstance(a, ast.Starred) for a in node.args)
            and all(k.arg and isinstance(k.value, ast.Constant) for k in node.keywords)):
        return ast.Call(func=node.func, args=[recurse(a) for a in node.args], keywords=node.keywords)
    holes.append(node)
    return ast.Name(id=f"{HOLE}{len(holes) - 1}", ctx=ast.Load())


class _Rewriter(ast.NodeTransformer):
    def __init__(self):
        self.predicates: list[tuple[ast.expr, str]] = []
        self.holes: list[ast.expr] = []

    def visit_Try(self, node):  # an assert here may be expected to fail: leave it to the checker
        return node

    visit_TryStar = visit_Try

    def visit_Assert(self, node):
        holes: list[ast.expr] = []
        predicate = _split(node.test, holes)
        self.holes += holes
        self.predicates.append((predicate, ast.unparse(node.test)[:300]))
        thunk = ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=ast.Tuple(elts=holes, ctx=ast.Load()))
        call = ast.Call(ast.Name("__r1_emit", ast.Load()), [ast.Constant(len(self.predicates) - 1), thunk], [])
        return ast.copy_location(ast.Expr(call), node)


def rewrite_check(test_code: str, entry_point: str = "candidate") -> tuple[str, list[tuple[ast.expr, str]], int, bool]:
    """(the test code to run in the checker, the predicates by assert index with their source text,
    how many asserts stay decided inside, whether the checker may share the candidate's process).

    Sharing is allowed only when `check` is nothing but asserts (and imports) whose holes are all calls
    of the candidate on literal arguments: then every value the test code reports is a return value of
    the candidate, which the candidate could choose anyway, and there is no state of the test code's
    own that a candidate in the same process could forge. It saves a process per grading."""
    tree = ast.parse(test_code)
    rewriter = _Rewriter()
    checks = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "check"]
    plain = bool(checks) and all(_plain(stmt) for stmt in checks[-1].body) and \
        all(isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom, ast.Assign, ast.Expr)) and not
            any(isinstance(m, ast.Assert) for m in ast.walk(n)) for n in tree.body if n not in checks)
    for node in checks:
        rewriter.visit(node)
    residual = sum(isinstance(n, ast.Assert) for n in ast.walk(tree))
    callers = {"candidate", entry_point}
    shared = plain and residual == 0 and all(_literal_call(hole, callers) for hole in rewriter.holes)
    return ast.unparse(ast.fix_missing_locations(tree)), rewriter.predicates, residual, shared


def _plain(stmt: ast.stmt) -> bool:
    return isinstance(stmt, (ast.Assert, ast.Import, ast.ImportFrom, ast.Pass)) or \
        (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))


def _literal_call(hole: ast.expr, callers: set[str]) -> bool:
    if not (isinstance(hole, ast.Call) and isinstance(hole.func, ast.Name) and hole.func.id in callers):
        return False
    try:
        for arg in [*hole.args, *(k.value for k in hole.keywords)]:
            ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return all(k.arg for k in hole.keywords)


def holds(predicate: ast.expr, holes) -> bool:
    """The predicate on the reported hole values (decoded builtins). Any error is a failed assert."""
    if type(holes) is not tuple:
        raise ValueError("hole values must come as a tuple")
    return bool(_evaluate(predicate, holes))


def _number(value):
    if type(value) not in (int, float, bool, complex):
        raise TypeError(f"arithmetic on {type(value).__name__}")
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise ValueError("integer too large")
    return value


def _evaluate(node: ast.expr, holes: tuple):
    ev = lambda child: _evaluate(child, holes)  # noqa: E731
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if not node.id.startswith(HOLE):
            raise ValueError(f"unknown name {node.id!r}")
        return holes[int(node.id[len(HOLE):])]
    if isinstance(node, ast.Tuple):
        return tuple(ev(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Set):
        return {ev(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        value = ev(node.operand)
        return not value if isinstance(node.op, ast.Not) else -_number(value) if isinstance(node.op, ast.USub) \
            else +_number(value)
    if isinstance(node, ast.BinOp):
        left, right = ev(node.left), ev(node.right)
        sequences = (str, list, tuple)
        if not (isinstance(node.op, ast.Add) and type(left) in sequences and type(left) is type(right)):
            left, right = _number(left), _number(right)
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.BoolOp):
        value = None
        for child in node.values:
            value = ev(child)
            if bool(value) != isinstance(node.op, ast.And):
                return value
        return value
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = ev(comparator)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return CALLS[_callee(node.func)](*[ev(a) for a in node.args], **{k.arg: k.value.value for k in node.keywords})
    raise ValueError(f"cannot evaluate {type(node).__name__}")
