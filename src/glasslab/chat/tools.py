"""The calculator tool and the interceptor that runs it during generation.

The calculator walks the expression's `ast` and allows only numbers, + - * / // % ** and parentheses: model
output is untrusted text, so it is never passed to `eval`. Arithmetic is exact (fractions), so `7/2*2` is 7 and
countdown answers with intermediate fractions score correctly.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from fractions import Fraction

from glasslab.data.tokenizer import Tokenizer

MAX_CHARS = 200  # longer "expressions" are not worth parsing
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**100  # keeps 9**9**9-style inputs from eating the CPU

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """The expression is not plain arithmetic, or cannot be computed. Messages are short: the model reads them."""


def parse(expr: str) -> ast.expr:
    """The expression's syntax tree, after checking it holds nothing but arithmetic."""
    if len(expr) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        with warnings.catch_warnings():  # e.g. "3and 4" parses with a SyntaxWarning on stderr: model text, not ours
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise CalcError("not arithmetic") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if type(node.value) in (int, float) and math.isfinite(node.value) and abs(node.value) <= MAX_MAGNITUDE:
                continue
        elif isinstance(node, (ast.BinOp, ast.UnaryOp)) or type(node) in _BINARY or type(node) in _UNARY:
            if type(getattr(node, "op", node)) in _BINARY | _UNARY:
                continue
        raise CalcError(f"'{ast.unparse(node)}' not allowed")
    return tree


def _value(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_value(node.operand))
    assert isinstance(node, ast.BinOp)
    left, right = _value(node.left), _value(node.right)
    if isinstance(node.op, ast.Pow):
        if right.denominator != 1 or abs(right) > MAX_EXPONENT:
            raise CalcError(f"exponent not a whole number up to {MAX_EXPONENT}")
        if left == 0 and right < 0:
            raise CalcError("division by zero")
    try:
        out = _BINARY[type(node.op)](left, right)
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    if abs(out) > MAX_MAGNITUDE:
        raise CalcError("result too large")
    return Fraction(out)


def calculate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError when it is not one."""
    return _value(parse(expr))


def numbers_in(expr: str) -> list[Fraction]:
    """The literal numbers an expression uses, as a multiset (countdown checks each given number is used at most once)."""
    return [Fraction(n.value) for n in ast.walk(parse(expr)) if isinstance(n, ast.Constant)]


def format_number(x: Fraction) -> str:
    """Integers exactly; other values as a short decimal."""
    return str(x.numerator) if x.denominator == 1 else f"{float(x):.6g}"


def run_calculator(expr: str) -> str:
    """What the tool answers: the value, or `error: ...` for the model to read."""
    try:
        return format_number(calculate(expr))
    except CalcError as e:
        return f"error: {e}"


class ToolInterceptor:
    """An `Interceptor` for `generate`: when a row's current assistant segment is `<|tool_call|>EXPR` and the
    model just sampled `<|end|>`, it forces `<|tool|>RESULT<|end|><|assistant|>` so the model continues with
    the result in view. Stateless: everything it needs is in the completion so far."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.call_id = tok.id_of("<|tool_call|>")
        self.tool_id = tok.id_of("<|tool|>")
        self.assistant_id = tok.id_of("<|assistant|>")

    def __call__(self, row: int, completion: list[int]) -> list[int] | None:
        if not completion or completion[-1] != self.tok.end_id:
            return None
        starts = [i for i, t in enumerate(completion) if t == self.assistant_id]
        segment = completion[starts[-1] + 1 if starts else 0 : -1]
        if not segment or segment[0] != self.call_id:
            return None
        result = run_calculator(self.tok.decode(segment[1:], skip_special=True))
        return [self.tool_id, *self.tok.encode(result), self.tok.end_id, self.assistant_id]
