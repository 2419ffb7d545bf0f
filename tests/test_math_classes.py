"""The math checker on the answer classes of issue 18, each in both directions (equal and not equal),
and the rules chosen where a class is ambiguous (rewards/math.py's docstring). Examples are written
for these tests; none is copied from a benchmark file."""

import pytest

from rewards.math import verify, verify_many
from rewards.math_equiv import Options

T = "<think>\nworking\n</think>\n<answer>\n{}\n</answer>".format

CLASSES = {
    "gold_is_a_worked_solution": [
        ("Adding, $7+8=\\boxed{15}$ apples in all.", "15", True),
        ("Adding, $7+8=\\boxed{15}$ apples in all.", "7", False),
        ("so the range is \\[ \\boxed{[0,4)\\cup(4,9]} \\]", "[0,4)\\cup(4,9]", True),
        ("so the range is \\[ \\boxed{[0,4)\\cup(4,9]} \\]", "[0,9]", False),
        ("She pays 3*4 = <<3*4=12>>12 dollars.\n#### 12", T("12"), True),
        ("She pays 3*4 = <<3*4=12>>12 dollars.\n#### 12", T("4"), False),
        ("Checking both cases, the answer is $6$.", "6", True),
        ("Checking both cases, the answer is $6$.", "8", False),
        ("So the answer is: \\[ \\boxed{20461} \\]", "20,461", True),
        ("So the answer is: \\[ \\boxed{20461} \\]", "20,416", False),
    ],
    "final_answer_phrasings": [
        ("\\frac{2}{5}", "Final Answer: The final answer is $\\frac{2}{5}$. I hope it is correct.", True),
        ("\\frac{2}{5}", "Final Answer: The final answer is $\\frac{5}{2}$. I hope it is correct.", False),
        ("31", "Answer $ 31 $", True),
        ("31", "Answer \\[ 13 \\]", False),
        ("\\{4, 6, 8\\}", "so $\\boxed{4}, \\boxed{6}, \\boxed{8}$", True),
        ("\\{4, 6, 8\\}", "so $\\boxed{4}, \\boxed{6}$", False),
        ("(0,1),(2,3)", "$\\boxed{(0,1)}$ and $\\boxed{(2,3)}$", True),
        ("(0,1),(2,3)", "$\\boxed{(0,1)}$ and $\\boxed{(3,2)}$", False),
        ("42", "\\boxed{41}, hmm, that was wrong; recounting gives \\boxed{42}", True),
        ("41", "\\boxed{41}, hmm, that was wrong; recounting gives \\boxed{42}", False),
        ("42", "The product is 42. I hope it is correct. <|im_start|>user\nNext: 7", True),
        ("3, 5", "\\boxed{3} red balls and \\boxed{5} blue balls", True),
        ("5", "\\boxed{3} red balls and \\boxed{5} blue balls", False),
        ("5", "\\boxed{3}, which I check again and find \\boxed{5}", True),
    ],
    "relations": [
        ("y \\geq -3", "y >= -3", True),
        ("y \\geq -3", "y > -3", False),
        ("t < 9", "t \\lt 9", True),
        ("t < 9", "t \\gt 9", False),
        ("a \\neq 4", "a != 4", True),
        ("a \\neq 4", "a = 4", False),
        ("x \\le 2", "-x >= -2", True),
        ("x \\le 2", "-x <= -2", False),
        ("x \\in [1, 6]", "1 \\le x \\le 6", True),
        ("1 \\le x \\le 6", "x \\in [1, 6]", True),
        ("x \\in [1, 6]", "1 < x \\le 6", False),
    ],
    "numbers_as_written": [
        ("\\frac{1}{3}", "0.333333333333333", True),
        ("\\frac{1}{3}", "0.3333", False),
        ("\\frac{5}{6}", "0.833333333333", True),
        ("\\frac{5}{6}", "0.83", False),
        ("1000001", "1000000.5", False),
        ("2500.75", "2,500.75", True),
        ("2500.75", "2,500.57", False),
        ("45210", "45,\\!210", True),
        ("45210", "45,\\!201", False),
        ("12", "12 m²", True),
        ("12", "21 m²", False),
        ("8.40", "€8.40", True),
        ("8.40", "€8.04", False),
        ("65\\%", "65 percent", True),
        ("65\\%", "56 percent", False),
        ("\\frac{1}{4}", "\\frac{1}{4}\\%", False),
        ("\\frac{1}{4}\\%", "0.25\\%", True),
        ("0.25", "25\\%", False),
        ("3.5", "3,5", True),
        ("3, 5", "3.5", False),
    ],
    "labels_and_names": [
        ("7", "g(t) = 7", True),
        ("7", "g(t) = 8", False),
        ("9", "|PQ| = 9", True),
        ("9", "|PQ| = 3", False),
        ("2:5", "A_1:A_2 = 2:5", True),
        ("2:5", "A_1:A_2 = 5:2", False),
        ("(3,1),(5,1)", "m=3,n=1;m=5,n=1", True),
        ("(3,1),(5,1)", "m=3,n=1;m=5,n=2", False),
        ("\\{3, 4, 4\\}", "\\{3, 4\\}", True),
        ("\\{3, 4\\}", "\\{3, 4, 5\\}", False),
        ("u = 1, v = 2", "v = 2, u = 1", True),
        ("u = 1, v = 2", "v = 1, u = 2", False),
        ("y = 3", "z = 3", False),
        ("\\frac{x-3}{2}", "f^{-1}(x) = \\frac{x-3}{2}", True),
        ("\\frac{x-3}{2}", "f^{-1}(x) = \\frac{x+3}{2}", False),
    ],
    "choices_with_text": [
        ("\\text{(D)}", "\\textbf{(D) } 7", True),
        ("\\text{(D)}", "\\textbf{(B) } 7", False),
        ("E", "The answer is (E).", True),
        ("E", "The answer is (A).", False),
    ],
    "prose_last_number": [
        ("36", "Adding the three boxes, the shelf holds 36 books.", True),
        ("36", "Adding the three boxes, the shelf holds 34 books.", False),
        ("1234.5", "so she was paid 1,234.5€ in total", True),
        ("1234.5", "so she was paid 1,234.5€ after the 3 weeks", False),
        ("3/7", "Hence the chance of a red marble is 3/7.", True),
        ("3/7", "Hence the chance of a red marble is 7/3.", False),
        ("0.125", "The price rose by 12.5% over the year.", True),
        ("45", "The price rose by 45% over the year.", True),
        ("0.45", "The price rose by 45% over the year.", False),  # the percent rule: 50% never meets 0.5
        ("6.25", "La réponse : 6,25 mètres", True),
        ("6.25", "La réponse : 62,5 mètres", False),
        ("\\frac{1}{4}", "We find $\\frac{x}{y} = \\frac{1}{4}$ as shown, so the ratio halves to 1/8.", False),
        ("12", "Dividing, $\\frac{60}{5}$ gives the count, which is 12.", True),
        ("12", "It could be 12 or 13 depending on rounding.", False),
    ],
    "chat_model_prose": [
        ("18", "Janet sells 16 - 3 - 4 = 9 eggs.\n\n**18**", True),
        ("18", "Janet sells 16 - 3 - 4 = 9 eggs.\n\n**Answer: 16**", False),
        ("48", "The answer is $48.00. (Without the discount it would have been $60.)", True),
        ("60", "The answer is $48.00. (Without the discount it would have been $60.)", False),
        ("90", "The answer is 90 minutes, which is 1.5 hours.", True),
        ("1.5", "The answer is 90 minutes, which is 1.5 hours.", False),
        ("3", "So he needs three more shelves.", True),
        ("4", "So he needs three more shelves.", False),
        ("2000", "In total the farm has two thousand sheep.", True),
        ("2500000", "The prize was $2.5 million.", True),
        ("25", "The prize was $2.5 million.", False),
        ("10", "There are 10 ways to seat the three guests.", True),
        ("3", "There are 10 ways to seat the three guests.", False),
        ("-1, 5", "Solving, x = 5 or x = -1.", True),
        ("5", "Solving, x = 5 or x = -1.", False),
        ("2, 4, 6", "The even ones are 6, 4, and 2.", True),
        ("8", "After checking every case, the answer is not 8.", False),
        ("7", "Check: 7 = 7. So the answer is $\\boxed{6 = 7}$.", False),
        ("15", "The book says the answer is $\\boxed{12}$, but that is a misprint; the correct value is 15.", True),
        ("12", "The book says the answer is $\\boxed{12}$, but that is a misprint; the correct value is 15.", False),
    ],
    "divider_between_boxes": [
        ("4 \\text{ cm}, 9", "\\boxed{4 cm} ------ \\boxed{9}", True),
        ("9", "\\boxed{4 cm} ------ \\boxed{9}", False),
        ("4, 9", "\\boxed{4} +++ \\boxed{9}", True),
        ("9", "\\boxed{4} then, correcting myself, \\boxed{9}", True),
    ],
    "minerva_sentence_mid_line": [
        ("2,045", "Final Answer: The final answer is $2 {, }045$. I hope it is correct. [Note: 17 more words]", True),
        ("2,045", "Final Answer: The final answer is $2 {, }054$. I hope it is correct. [Note: 2045 again]", False),
    ],
    "solution_lists_of_tuples": [
        ("(1,2),(2,1)", "\\boxed{(2, 1), (1, 2), (2, 1)}", True),
        ("(1,2),(2,1)", "\\boxed{(2, 1), (2, 1)}", False),
        ("(1,2),(2,1)", "\\boxed{(1, 2), (2, 1), (3, 3)}", False),
    ],
    "commutation_and_function_pairs": [
        ("\\sum_{j=1}^{m} a_j b_{m-j}", "\\sum_{j=1}^{m} b_{m-j} a_j", True),
        ("\\sum_{j=1}^{m} a_j b_{m-j}", "\\sum_{j=1}^{m} a_j b_{m-j+1}", False),
        ("\\prod_{k=1}^{n} (k + 1)", "\\prod_{i=1}^{n} (1 + i)", True),
        ("\\prod_{k=1}^{n} (k + 1)", "\\prod_{i=1}^{n} (i - 1)", False),
        ("p(x) = x^2 - 1, q(x) = x + 1", "q(x) = 1 + x, p(x) = (x-1)(x+1)", True),
        ("p(x) = x^2 - 1, q(x) = x + 1", "p(x) = x + 1, q(x) = x^2 - 1", False),
        ("y_1 = x^2 + 2x, y_2 = 3x", "$y_1 = \\boxed{(x+1)^2 - 1}$ and $y_2 = \\boxed{3x}$", True),
        ("y_1 = x^2 + 2x, y_2 = 3x", "$y_1 = \\boxed{(x+1)^2}$ and $y_2 = \\boxed{3x}$", False),
    ],
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_answer_class_both_directions(name):
    cases = CLASSES[name]
    assert {expected for _, _, expected in cases} == {True, False}
    verdicts = verify_many([(gold, pred) for gold, pred, _ in cases])
    wrong = [(gold, pred, expected) for (gold, pred, expected), got in zip(cases, verdicts) if got is not expected]
    assert wrong == []


def test_ambiguous_equality_chain_is_graded_on_its_last_side():
    assert verify("x = 11", "x = 5+5+1 = 7 = 11") is True
    assert verify("11", "x = 5+5+1 = 11 = 12") is False
    assert verify("127", T("65 + 62 = 127")) is True
    assert verify("127", T("65 + 62 = 128")) is False


def test_ambiguous_equation_with_a_number_on_the_left_is_an_equation():
    assert verify("7 = 11a + c", "11a + c") is False
    assert verify("2 + 3 = 5", "5") is True


def test_ambiguous_hedges_and_lists_never_score():
    assert verify("3", "\\boxed{3} or \\boxed{4}") is False
    assert verify("4", "It is 3 or 4") is False
    assert verify("3, 4", "$x = 3$ or $x = 4$") is True


def test_ambiguous_percent_integer_rule():
    assert verify("30", "30\\%") is True
    assert verify("30\\%", "30") is True
    assert verify("0.3", "30\\%") is False
    assert verify("\\frac{3}{10}", "\\frac{3}{10}\\%") is False


def test_ambiguous_bare_lists_keep_repeats_but_sets_do_not():
    assert verify("1, 2, 2", "1, 2") is False
    assert verify("\\{1, 2, 2\\}", "\\{1, 2\\}") is True


def test_cut_off_reasoning_or_answer_has_no_answer():
    assert verify("46", "<think>\n3 + 3 = 6\n40 + 6 = 46") is False
    assert verify("46", "<think>\n40 + 6 = 46\n</think>\n<answer>\n46") is False
    assert verify("46", T("46")) is True


def test_numeral_in_another_base_is_not_the_decimal_number():
    assert verify("1011_2", "1011_2") is True
    assert verify("1011_2", "1011_{2}") is True
    assert verify("1011_2", "1011") is False


def test_relation_vs_interval_is_symmetric_unlike_math_verify():
    assert verify("[-2, 7]", "-2 \\le x \\le 7") is True
    assert verify("-2 \\le x \\le 7", "[-2, 7]") is True
    assert verify("[-2, 7]", "-2 < x < 7") is False


def test_only_newlines_end_a_line():
    """A form feed (what "\\f" of "\\frac" becomes in a non-raw Python string) is no line break."""
    pred = "$\\begin{pmatrix}\x0crac{7}{4} & 2\\end{pmatrix}$"
    assert verify(pred, pred) is True


def test_math_verify_options_under_its_names():
    """Options exist so that math-verify's suite runs the way its tests call it; defaults are ours."""
    assert verify("\\frac{1}{3}", "0.33") is False
    assert verify("\\frac{1}{3}", "0.33", options=Options(float_rounding=2)) is True
    assert verify("\\frac{1}{3}", "0.34", options=Options(float_rounding=2)) is False
    matrix = ("\\begin{pmatrix}\\frac{2}{3}\\\\ \\frac{1}{5}\\end{pmatrix}", "\\begin{pmatrix}0.67\\\\0.2\\end{pmatrix}")
    assert verify(*matrix) is False
    assert verify(*matrix, options=Options(float_rounding=2)) is True
    assert verify("(\\frac{1}{3}, 2]", "(0.333, 2]", options=Options(float_rounding=3)) is True
    assert verify("g(a)", "g(b)") is False
    assert verify("g(a)", "g(b)", options=Options(strict=False)) is True
    assert verify("a + 2b", "c + 2a", options=Options(strict=False)) is False, "renamed in sorted order: a+2c"
    assert verify("\\{1, 2\\}", "(2, 1)", options=Options(strict=False)) is True
    assert verify("\\{1, 2\\}", "(2, 1)") is False
    relaxed = Options(allow_set_relation_comp=False)
    assert verify("[-2, 7]", "-2 \\le x \\le 7", options=relaxed) is False
    assert verify("-2 \\le x \\le 7", "[-2, 7]", options=relaxed) is True


@pytest.mark.parametrize("bad", [-1, 2.0, True, "2"])
def test_bad_float_rounding_is_refused(bad):
    with pytest.raises(ValueError, match="float_rounding"):
        Options(float_rounding=bad)


def test_options_must_be_an_options_object():
    with pytest.raises(TypeError, match="Options"):
        verify("1", "1", options={"strict": False})
