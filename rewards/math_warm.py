"""Imported by the pool's forkserver (and by each spawned worker): runs one check of each kind once,
so that sympy's lazy imports and caches and the ANTLR parser's warm-up (together about a second)
are paid once in the server, not by every forked worker on its first real checks."""

from rewards.math_equiv import check

WARM_UP = [
    ("\\frac{x^{2}-1}{x-1}", "x+1"), ("\\sqrt{8}", "2\\sqrt{2}"), ("(-\\infty, 3]", "x \\le 3"), ("2x+3y=6", "4x+6y=12"),
    ("\\{1, 2\\}", "2, 1"), ("(1, 2)", "(1, 2)"), ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("\\pi", "3.14159265"), ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}"), ("(1,2)\\cup(3,4)", "1<x<2"), ("x>2", "-x<-2"),
    ("2^{100}", "1267650600228229401496703205376"), ("\\sin^2 x+\\cos^2 x", "1"), ("\\log_2 8", "3"),
]
for gold, pred in WARM_UP:
    check(gold, pred)
