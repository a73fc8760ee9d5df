"""The calculator tool: arithmetic only, bounded, and results written as GSM8K writes them."""

import warnings

import pytest

from nanochat_flyte.inference.calculator import calculate


@pytest.mark.parametrize("expression, result", [
    ("48/2", "24"), ("48+24", "72"), ("12/60", "0.2"), ("0.2*50", "10"), ("5*.2", "1"), ("(3+4)*2", "14"),
    ("-3+1", "-2"), ("2**10", "1024"), ("7//2", "3"), ("7%3", "1"), ("1,200*2", "2400"), (" 10/3 ", "3.333333"),
    ("2/3", "0.666667"), ("1e3/4", "250"), ("10**64*10**64", "1" + "0" * 128),
    # a float too small or too large for 6 decimals' exact digits: never 0 or -0, nor 309 digits of round-off
    ("3/1000000000", "3e-09"), ("-1/3000000", "-3.3333333333333335e-07"), ("1e300*1e8", "1e+308"), ("-0.0", "0"),
])
def test_arithmetic(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize("expression", [
    "", "1/0", "5%0", "__import__('os').system('true')", "open('x')", "x+1", "'a'*3", "[1]*3", "2**1000",
    "9**9**9", "(-8)**0.5", "1,2", "1 if 1 else 2", "10**400*1.0", "1" * 201,
    "(9**64)**64*(9**64)**64",  # 26,000 digits: more than Python writes as text (4,300)
    "((((((9**64)**64)**64)**64)**64)**64)",  # each level 64 times the digits of the last: hours and gigabytes
])
def test_anything_else_has_no_result(expression):
    assert calculate(expression) is None


def test_whole_numbers_stay_bounded_along_the_way():
    assert calculate("(10**64)**2") == "1" + "0" * 128  # 426 bits
    assert calculate("(10**64)**3") is None and calculate("(10**64)**3 // 10**64") is None  # 638 bits midway


def test_a_string_with_a_control_character_never_reaches_the_parser():
    """Python's parser warns on stderr about a bad escape in a string literal, and the warning carries the character
    (ESC here) as the model wrote it."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert calculate("'\\\x1b'") is None and calculate("1+'\\\x07'") is None
    assert warned == []
