"""Imported by the pool's forkserver (and by each spawned worker): runs one check of each kind once,
so that sympy's lazy imports and caches and the ANTLR parser's warm-up (together about a second)
are paid once in the server, not by every forked worker on its first real checks."""

from rewards.math_equiv import check

WARM_UP = [
    ("\\frac{x^{2}-1}{x-1}", "x+1"), ("\\sqrt{8}", "2\\sqrt{2}"), ("(-\\infty, 3]", "x \\le 3"), ("2x+3y=6", "4x+6y=12"),
    ("\\{1, 2\\}", "2, 1"), ("(1, 2)", "(1, 2)"), ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("\\pi", "3.14159265"), ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}"), ("(1,2)\\cup(3,4)", "1<x<2"), ("x>2", "-x<-2"),
    ("2^{100}", "1267650600228229401496703205376"), ("\\sin^2 x+\\cos^2 x", "1"), ("\\log_2 8", "3"),
    # Warms the ANTLR parser's prediction cache for common shapes too: forked workers inherit it, and
    # a cold cache makes each worker's first checks of a shape several times slower.
    ("x \\ge 5", "-x \\le -5"), ("x \\ne 2", "x = 2"), ("-2 \\le x \\le 7", "[-2, 7]"), ("y < -1", "(-\\infty, -1)"),
    ("\\sum_{k=0}^{n-1} a_k b_{n-k}", "\\sum_{j=0}^{n-1} b_{n-j} a_j"), ("\\prod_{i=1}^{n} (i+1)", "(n+1)!"),
    ("f(x) = 2x + 2", "2(x+1)"), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("(1, \\frac{9}{2})", "(1, 4.5)"),
    ("e^{2}", "7.389"), ("\\tan^2(y)+1", "\\sec^2(y)"), ("10^{\\frac{-5+\\sqrt{13}}{6}}", "10^{\\frac{\\sqrt{13}-5}{6}}"),
    ("\\dfrac{\\pi}{3}", "60"), ("|x-1|", "\\left|x - 1\\right|"), ("\\binom{5}{2}", "10"), ("2\\sqrt{5}", "\\sqrt{20}"),
]
for gold, pred in WARM_UP:
    try:
        check(gold, pred)
    except Exception:  # a warm-up is no check: it must never stop the forkserver from starting
        pass
