"""The assistant's one tool, a calculator, as nanochat gives it to its chat models for GSM8K.

GSM8K's worked solutions mark every calculation: "48/2 = <<48/2=24>>24 clips". SFT turns each mark into a tool call
(conversation.py): the model writes the expression between <|python_start|> and <|python_end|>, and the result comes
back between <|output_start|> and <|output_end|>. At inference the engine runs the tool: when the model closes an
expression, the calculator's answer is fed to it as the next tokens (engine.py), so a small model need not do
arithmetic in its head.

Only arithmetic is evaluated: numbers, + - * / // % ** and parentheses, parsed with `ast` (never `eval`), with
bounds on the expression's length, on exponents and on the size of every whole number along the way, so a model
cannot make it run for long or allocate much.
"""

import ast
import math
import operator
import re

MAX_EXPRESSION_CHARS = 200  # GSM8K's longest calculation is under 100 characters
MAX_EXPONENT = 64  # 10 ** 64 already dwarfs any grade-school quantity; 9 ** 9 ** 9 would hang the decoder
# Every whole number along the way stays under 2 ** 512 (155 digits): then no one operation makes more than
# 512 x 64 bits, where nested powers ((9 ** 64) ** 64) ** 64 ... multiply the bits 64-fold at each level.
MAX_INTEGER_BITS = 512
DIGIT_GROUPS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # "1,200" -> "1200"; a comma elsewhere is not arithmetic
# What arithmetic is written with. Anything else is refused before Python's parser sees it: the parser warns on
# stderr about a string literal's bad escape, and would copy a model-written control character there.
ARITHMETIC_CHARACTERS = re.compile(r"[0-9.eE_+\-*/%() ]*")

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return bounded(BINARY[type(node.op)](left, right))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def bounded(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise ValueError("number too large")
    return value


def format_number(value: int | float) -> str:
    """As GSM8K writes results: whole numbers without a decimal point, others to at most 6 decimals. A float beyond
    what those show exactly, below a millionth (not 0) or from 2**53 up (1e300 * 1e8), is written as Python writes
    it (3e-09, 1e+308): its digits stay few, and never say 0 for a number that is not."""
    if isinstance(value, float) and (abs(value) >= 2**53 or 0 < abs(value) < 1e-6):
        return repr(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # (-0.0 too)
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}".rstrip("0").rstrip(".")


def calculate(expression: str) -> str | None:
    """The value of an arithmetic expression as text, or None when it is not one (or cannot be computed): the
    engine then lets the model go on without a result."""
    expression = DIGIT_GROUPS.sub("", expression.strip())
    if not expression or len(expression) > MAX_EXPRESSION_CHARS or not ARITHMETIC_CHARACTERS.fullmatch(expression):
        return None
    try:
        value = evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ArithmeticError, TypeError):  # ZeroDivisionError, OverflowError are these
        return None
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        return None  # (-8) ** 0.5 is complex
    return format_number(value)
