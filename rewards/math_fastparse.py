"""A small recursive-descent parser for the plain algebra most answers are written in, building the
same unevaluated sympy trees as latex2sympy2_extended does, about 20x faster than its ANTLR grammar.

Covers: integers and decimals, single-letter variables (`e` is Euler's number and capitals are
lower-case symbols, as in latex2sympy; `f(x)`, `a/bc` and `3\\frac{1}{2}` are left to it),
+ - * / ^ !, `\\cdot`, `\\times`, implicit products (`2x`, `2(x+1)`, `\\pi r^2`), ( ) and { } groups,
`\\frac{}{}`, `\\binom{}{}`, `\\sqrt{}`, `\\sqrt[n]{}`, `\\sin` `\\cos` `\\tan` `\\ln` `\\exp` of a group, `\\pi`, `\\infty`, and relations (`<`, `\\le`, `\\ne`, chains). Anything else (relations, sets, functions,
subscripts, `!`, `|`, other commands) returns None and goes to latex2sympy. Nothing is evaluated:
the parser only constructs sympy objects, so a power tower stays a tree for math_equiv's guards.
"""

from __future__ import annotations

import re

import sympy

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|([A-Za-z])|(\\frac|\\sqrt|\\pi|\\cdot|\\times|\\infty|"
                    r"\\leq?|\\geq?|\\neq?|\\binom|\\sin|\\cos|\\tan|\\ln|\\exp)(?![A-Za-z])|([-+*/^(){}\[\]<>!]))")
_FUNCTIONS = {"\\sin": sympy.sin, "\\cos": sympy.cos, "\\tan": sympy.tan, "\\exp": sympy.exp,
              "\\ln": lambda x, evaluate: sympy.log(x, sympy.E, evaluate=evaluate)}
_RELATIONS = {"<": sympy.StrictLessThan, ">": sympy.StrictGreaterThan, "\\le": sympy.LessThan, "\\leq": sympy.LessThan,
              "\\ge": sympy.GreaterThan, "\\geq": sympy.GreaterThan, "\\ne": sympy.Unequality, "\\neq": sympy.Unequality}


class _Unsupported(Exception):
    """The input uses notation this parser leaves to latex2sympy."""


def _tokens(s: str) -> list[str]:
    tokens, position = [], 0
    while position < len(s):
        match = _TOKEN.match(s, position)
        if match is None:
            if s[position:].strip():
                raise _Unsupported(s[position:])
            break
        tokens.append(next(group for group in match.groups() if group is not None))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Unsupported(f"expected {expected!r}, got {token!r}")
        self.i += 1
        return token

    def expr(self):
        terms = [self.term()]
        while self.peek() in ("+", "-"):
            sign = self.take()
            term = self.term()
            terms.append(term if sign == "+" else sympy.Mul(-1, term, evaluate=False))
        return terms[0] if len(terms) == 1 else sympy.Add(*terms, evaluate=False)

    def term(self):
        factors = [self.unary()]
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                factors.append(self.unary())
            elif token == "/":
                self.take()
                factors.append(sympy.Pow(self.unary(), -1, evaluate=False))
                if self.peek() not in (None, "+", "-", ")", "}", "]", "*", "/", "\\cdot", "\\times", *_RELATIONS):
                    raise _Unsupported("a/bc")  # latex2sympy reads it as a/(bc)
            elif token is not None and token not in ("+", "-", ")", "}", "]", "^") and token not in _RELATIONS:
                factors.append(self.power())  # implicit product: 2x, 2(x+1), \pi r^2
            else:
                break
        return factors[0] if len(factors) == 1 else sympy.Mul(*factors, evaluate=False)

    def unary(self):
        if self.peek() in ("-", "+"):
            sign = self.take()
            operand = self.unary()
            if sign == "+":
                return operand
            return -operand if operand.is_Number else sympy.Mul(-1, operand, evaluate=False)  # -5, -oo
        return self.power()

    def power(self):
        base = self.atom()
        while self.peek() == "!":
            self.take()
            base = sympy.factorial(base, evaluate=False)
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() == "{":
            exponent = self.group()
        elif self.peek() == "-":
            self.take()
            exponent = sympy.Mul(-1, self.atom(), evaluate=False)
        else:
            exponent = self.atom()
        if base == sympy.E:
            return sympy.exp(exponent, evaluate=False)
        return sympy.Pow(base, exponent, evaluate=False)

    def group(self):
        self.take("{")
        inner = self.expr()
        self.take("}")
        return inner

    def atom(self):
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            if self.peek() == "\\frac":
                raise _Unsupported("3\\frac{1}{2}")  # a mixed number in latex2sympy
            return sympy.Integer(token) if token.isdigit() else sympy.Float(token)
        if token.isalpha():
            if self.peek() == "(" or (token == "d" and (self.peek() or "").isalpha()):
                raise _Unsupported("f(x), dx")  # a function application, a differential in latex2sympy
            # latex2sympy's conventions: e is Euler's number, capitals are lower-case symbols
            return sympy.E if token == "e" else sympy.Symbol(token.lower())
        if token == "\\pi":
            return sympy.pi
        if token == "\\infty":
            return sympy.oo
        if token in ("(", "{"):
            inner = self.expr()
            self.take(")" if token == "(" else "}")
            return inner
        if token == "\\frac":
            numerator, denominator = self.group(), self.group()
            if denominator == 0:  # as latex2sympy: 0/0 is nan, a/0 is complex infinity (never a value)
                return sympy.nan if numerator == 0 else sympy.zoo
            return sympy.Mul(numerator, sympy.Pow(denominator, -1, evaluate=False), evaluate=False)
        if token == "\\binom":
            return sympy.binomial(self.group(), self.group(), evaluate=False)
        if token in _FUNCTIONS:  # \sin(x), \ln{x}; \sin x and \sin^2 x are left to latex2sympy
            if self.peek() not in ("(", "{"):
                raise _Unsupported(token)
            return _FUNCTIONS[token](self.atom(), evaluate=False)
        if token == "\\sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            radicand = self.group()
            return sympy.sqrt(radicand, evaluate=False) if index is None else \
                sympy.Pow(radicand, sympy.Pow(index, -1, evaluate=False), evaluate=False)
        raise _Unsupported(token)


def parse_plain(s: str):
    """A sympy expression or relation for plain algebra, or None when `s` needs the full LaTeX grammar."""
    try:
        parser = _Parser(_tokens(s))
        sides, operators = [parser.expr()], []
        while parser.peek() in _RELATIONS:
            operators.append(_RELATIONS[parser.take()])
            sides.append(parser.expr())
        if parser.peek() is not None:
            return None
        if not operators:
            return sides[0]
        relations = [op(a, b) for op, a, b in zip(operators, sides, sides[1:])]  # 1 < x <= 2: a conjunction
        return relations[0] if len(relations) == 1 else sympy.And(*relations)
    except (_Unsupported, ValueError, TypeError):
        return None
