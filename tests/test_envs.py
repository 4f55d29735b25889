"""Task environments, the safe calculator and the tool interceptor."""

import random
import sys
import textwrap
import warnings
from collections import Counter
from fractions import Fraction

import pytest

from glasslab.chat.format import Message, parse_completion
from glasslab.chat.tools import CalcError, ToolInterceptor, calculate, numbers_in, run_calculator
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs import ENVIRONMENTS, get_env
from glasslab.envs.base import Problem, final_answer, split_of
from glasslab.errors import GlasslabError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["0123456789+-*/=() Reach with Use the calculator. error: not arithmetic"], "char", 0)


# ---- calculator ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, value",
    [
        ("1+2", 3),
        ("7/2*2", 7),
        ("2**10", 1024),
        ("-3+4*(5-1)", 13),
        ("10/4", Fraction(5, 2)),
        ("17//5", 3),
        ("17%5", 2),
    ],
)
def test_calculator_is_exact_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "x+1",
        "(1).real",
        "[1, 2]",
        "1 if 1 else 2",
        "1<<3",
        "3<4",
        "True+1",
        "'a'*3",
        "f(2)",
        "9**9**9",
        "2**0.5",
        "1e999",
        "1/0",
        "",
        "1+",
        "3and 4",
        "1if",
    ],
)
def test_calculator_refuses_everything_but_arithmetic(expr):
    with warnings.catch_warnings(record=True) as caught:  # and says so in its answer only, not on stderr
        warnings.simplefilter("always")
        with pytest.raises(CalcError):
            calculate(expr)
        assert run_calculator(expr).startswith("error: ")
    assert not caught


def test_numbers_in_counts_every_literal():
    assert sorted(numbers_in("3*5+7-3")) == [3, 3, 5, 7]


def test_tool_interceptor_runs_the_call_and_hands_back_to_the_assistant(tok):
    tools = ToolInterceptor(tok)
    assert tok.decode(tools(0, tok.encode("<|tool_call|>12*34<|end|>"))) == "<|tool|>408<|end|><|assistant|>"
    assert tok.decode(tools(0, tok.encode("<|tool_call|>12*x<|end|>"))).startswith("<|tool|>error: ")
    # a second call, after the first result, is run too; the final answer's <|end|> is not a call
    second = "<|tool_call|>1+1<|end|><|tool|>2<|end|><|assistant|><|tool_call|>2*3<|end|>"
    assert tok.decode(tools(0, tok.encode(second))) == "<|tool|>6<|end|><|assistant|>"
    assert tools(0, tok.encode("<|tool_call|>1+1<|end|><|tool|>2<|end|><|assistant|>2<|end|>")) is None
    assert tools(0, tok.encode("408<|end|>")) is None
    assert tools(0, tok.encode("<|tool_call|>12*3")) is None  # call not finished yet


# ---- chat completions ------------------------------------------------------------------------------


def test_parse_completion_and_final_answer():
    text = "<|tool_call|>1*2<|end|><|tool|>2<|end|><|assistant|>2<|end|>"
    assert parse_completion(text) == [
        Message("assistant", "<|tool_call|>1*2"),
        Message("tool", "2"),
        Message("assistant", "2"),
    ]
    assert final_answer(text) == "2"
    assert final_answer("57<|end|>") == "57"
    assert final_answer("57") is None  # truncated: never ended
    assert final_answer("<|tool_call|>1*2<|end|>") is None  # a call is not an answer


# ---- registry --------------------------------------------------------------------------------------


def test_get_env_validates_options_and_names():
    assert set(ENVIRONMENTS) == {"arithmetic", "countdown", "calculator"}
    assert get_env("arithmetic", {"max_digits": 3}).options.max_digits == 3
    with pytest.raises(GlasslabError, match="arithmetic, countdown, calculator"):
        get_env("arithmetc")
    with pytest.raises(GlasslabError, match="unknown option 'max_digit'.*max_digits"):
        get_env("arithmetic", {"max_digit": 3})
    with pytest.raises(GlasslabError, match="min_digits"):
        get_env("arithmetic", {"min_digits": 3, "max_digits": 2})
    with pytest.raises(GlasslabError, match="not a subclass"):
        get_env("glasslab.chat.tools:CalcError")
    with pytest.raises(GlasslabError, match="cannot import"):
        get_env("no_such_module_xyz:Env")


def test_user_environment_by_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_env.py").write_text(
        textwrap.dedent("""
        from glasslab.envs.base import Environment, EnvOptions, Problem

        class Options(EnvOptions):
            word: str = "hi"

        class Echo(Environment):
            name = "echo"
            reward_names = ("correct",)
            Options = Options

            def sample_problem(self, rng):
                n = rng.randint(0, 999)
                return Problem(f"say {self.options.word} {n}", f"{self.options.word} {n}", 1)

            def ideal_answer(self, problem):
                return [("assistant", problem.answer)]

            def score(self, problem, completion):
                return {"correct": float(completion == problem.answer + "<|end|>")}
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    env = get_env("my_env:Echo", {"word": "yo"})
    p = env.problems("eval", 1, 0)[0]
    assert p.prompt.startswith("say yo") and env.score(p, p.answer + "<|end|>") == {"correct": 1.0}
    with pytest.raises(GlasslabError, match="unknown option 'wrd'"):
        get_env("my_env:Echo", {"wrd": "x"})
    sys.modules.pop("my_env", None)


# ---- the built-in environments ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "calculator"])
def test_eval_set_is_fixed_by_seed_and_never_overlaps_training(name):
    env = get_env(name)
    train = {p.prompt for p in env.problems("train", 300, seed=1)}
    evals = [env.problems("eval", 50, seed=s) for s in (1, 1, 2)]
    assert [p.prompt for p in evals[0]] == [p.prompt for p in evals[1]]  # fixed by the seed
    assert [p.prompt for p in evals[0]] != [p.prompt for p in evals[2]]  # another seed, another set
    assert not train & {p.prompt for e in evals for p in e}
    assert all(split_of(p.prompt) == "eval" for p in evals[2])


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "calculator"])
def test_ideal_answers_get_full_reward_and_garbage_none(name):
    env = get_env(name)
    for p in env.problems("train", 30, seed=0):
        turns = env.ideal_answer(p)
        completion = "<|end|>".join(c if i == 0 else f"<|{r}|>{c}" for i, (r, c) in enumerate(turns)) + "<|end|>"
        assert env.score(p, completion) == dict.fromkeys(env.reward_names, 1.0), (p, completion)
        assert env.score(p, "banana<|end|>") == dict.fromkeys(env.reward_names, 0.0)
        assert env.score(p, completion.removesuffix("<|end|>"))["format"] == 0.0  # truncated


def test_arithmetic_difficulty_is_digits_of_largest_operand():
    env = get_env("arithmetic", {"ops": ["+", "-", "*"], "min_digits": 1, "max_digits": 3, "level_weights": [0, 1, 1]})
    problems = env.problems("train", 200, seed=0)
    assert {p.difficulty for p in problems} == {2, 3}
    for p in problems:
        a, op, b = p.meta["a"], p.meta["op"], p.meta["b"]
        assert len(str(max(a, b))) == p.difficulty and p.prompt == f"{a}{op}{b}="
        assert int(p.answer) == calculate(f"{a}{op}{b}") and int(p.answer) >= 0  # no negatives by default
    p = problems[0]
    assert env.score(p, f"{int(p.answer) + 1}<|end|>")["correct"] == 0.0


def test_arithmetic_level_weights_by_digit_count_survive_a_narrower_range():
    rare = {"max_digits": 3, "level_weights": {3: 0.2}}  # as [envs.arithmetic] in tiny: 3-digit problems rare
    env, rng = get_env("arithmetic", rare), random.Random(0)
    counts = Counter(env.sample_problem(rng).difficulty for _ in range(4000))  # draws, before distinct problems
    assert 0.07 < counts[3] / 4000 < 0.115 and abs(counts[1] - counts[2]) < 300  # 0.2 / 2.2 = 9.1%; 1 and 2 equal
    narrow = get_env("arithmetic", {**rare, "min_digits": 3})  # RL's env_options over it: 3-digit only
    assert {p.difficulty for p in narrow.problems("train", 50, seed=0)} == {3}
    with pytest.raises(GlasslabError, match="level_weights needs 3 weights"):
        get_env("arithmetic", {"max_digits": 3, "level_weights": [1, 1]})
    with pytest.raises(GlasslabError, match="not all zero"):
        get_env("arithmetic", {"min_digits": 3, "max_digits": 3, "level_weights": {3: 0}})


def test_arithmetic_short_operand_share():
    three = {"min_digits": 3, "max_digits": 3}
    plain, short = get_env("arithmetic", three), get_env("arithmetic", {**three, "short_operand": 0.5})
    unchanged = get_env("arithmetic", {**three, "short_operand": 0.0})
    assert unchanged.problems("train", 50, seed=0) == plain.problems("train", 50, seed=0)  # 0 draws nothing extra

    def share_short(env) -> float:
        problems = env.problems("train", 1000, seed=0)
        return sum(len(str(min(p.meta["a"], p.meta["b"]))) < 3 for p in problems) / len(problems)

    assert share_short(plain) < 0.15  # uniform below 1000: about 10% have fewer digits by chance
    assert 0.45 < share_short(short) < 0.65  # half drawn short, plus the chance ones among the rest
    assert all(p.difficulty == 3 for p in short.problems("train", 100, seed=0))  # the largest keeps its digits
    assert get_env("arithmetic", {"short_operand": 1.0, "max_digits": 1}).problems("train", 5, seed=0)  # no 0-digit
    with pytest.raises(GlasslabError, match="short_operand"):
        get_env("arithmetic", {"short_operand": 1.5})


def test_arithmetic_digit_credit_is_aligned_at_the_units():
    env = get_env("arithmetic")
    p = Problem("92+32=", "124", 2, {})
    assert env.score(p, "124<|end|>") == {"correct": 1.0, "digits": 1.0, "format": 1.0}
    assert env.score(p, "114<|end|>") == {"correct": 0.0, "digits": pytest.approx(2 / 3), "format": 1.0}
    assert env.score(p, "24<|end|>")["digits"] == pytest.approx(2 / 3)  # a missing digit costs its position
    assert env.score(p, "1124<|end|>")["digits"] == pytest.approx(3 / 4)  # so does an extra one
    assert env.score(p, "421<|end|>")["digits"] == pytest.approx(1 / 3)
    assert env.score(p, "12 4<|end|>")["digits"] == 0.0  # not an integer: no credit


def test_arithmetic_place_diagnostics_tell_a_carry_error_from_a_misread_operand():
    env = get_env("arithmetic", {"min_digits": 3, "max_digits": 3})
    p = Problem("354+751=", "1105", 3, {"a": 354, "op": "+", "b": 751})
    places = lambda completion: env.diagnostics(p, completion)  # noqa: E731
    assert places("1105<|end|>") == {
        "place/units": 1.0,
        "place/tens": 1.0,
        "place/hundreds": 1.0,
        "place/thousands": 1.0,
    }
    assert places("1115<|end|>") == {
        "place/units": 1.0,
        "place/tens": 0.0,
        "place/hundreds": 1.0,
        "place/thousands": 1.0,
    }
    assert places("1107<|end|>")["place/units"] == 0.0 and places("1107<|end|>")["place/tens"] == 1.0
    assert places("105<|end|>")["place/thousands"] == 0.0 and places("105<|end|>")["place/units"] == 1.0
    assert set(places("x<|end|>").values()) == {0.0}  # malformed: wrong everywhere
    small = Problem("3-3=", "0", 1, {"a": 3, "op": "-", "b": 3})
    assert env.diagnostics(small, "0<|end|>") == {"place/units": 1.0}  # only the places the answer has
    mix = get_env("countdown")
    assert mix.diagnostics(mix.problems("eval", 1, seed=0)[0], "1+2<|end|>") == {}  # none by default


def test_countdown_accepts_any_fair_solution():
    env = get_env("countdown")
    p = env.sample_problem(random.Random(0))
    p = type(p)("Reach 22 with 3 5 7", "3*5+7", 3, {"numbers": [3, 5, 7], "target": 22})
    assert env.score(p, "7+3*5<|end|>") == {"correct": 1.0, "format": 1.0}
    assert env.score(p, "(7+5)*3-14<|end|>") == {"correct": 0.0, "format": 1.0}  # 14 is not given
    assert env.score(p, "7+7+7+1<|end|>") == {"correct": 0.0, "format": 1.0}  # 7 used thrice
    assert env.score(p, "22<|end|>") == {"correct": 0.0, "format": 1.0}
    assert env.score(p, "__import__('os')<|end|>") == {"correct": 0.0, "format": 0.0}


def test_calculator_format_requires_the_tool():
    env = get_env("calculator")
    p = env.problems("eval", 1, seed=0)[0]
    assert env.ideal_answer(p)[0] == ("assistant", "<|tool_call|>" + p.prompt.removesuffix("="))
    assert env.score(p, p.answer + "<|end|>") == {"correct": 1.0, "digits": 1.0, "format": 0.0}


def test_mixture_draws_members_by_weight_and_scores_with_the_member():
    from glasslab.config import build_config
    from glasslab.stages.rl import rl_env

    cfg = build_config({"rl": {"env": {"countdown": 3, "calculator": 1}}, "envs": {"calculator": {"max_digits": 4}}})
    mix = rl_env(cfg)
    assert mix.name == "countdown+calculator" and [e.name for e in mix.parts()] == ["countdown", "calculator"]
    assert mix.parts()[1].options.max_digits == 4  # each member keeps its own options
    assert mix.reward_names == ("correct", "format", "digits")  # countdown has no digits reward: it scores 0 there
    problems = mix.problems("train", 400, seed=0)
    share = sum(p.meta["env"] == "countdown" for p in problems) / len(problems)
    assert 0.68 < share < 0.82  # 3:1
    for p in problems[:40]:
        member = mix.parts()[0] if p.meta["env"] == "countdown" else mix.parts()[1]
        assert mix.prompt_messages(p) == member.prompt_messages(p)  # the calculator's system prompt included
        text = "".join(f"<|{r}|>{c}<|end|>" if r != "assistant" else f"{c}<|end|>" for r, c in member.ideal_answer(p))
        assert mix.score(p, text) == {name: member.score(p, text).get(name, 0.0) for name in mix.reward_names}
        assert mix.score(p, text)["correct"] == 1.0
    assert {p.prompt for p in problems}.isdisjoint(p.prompt for p in mix.problems("eval", 100, seed=0))


def test_mixture_weights_are_checked():
    from glasslab.config import build_config

    for bad in ({}, {"countdown": -1.0}, {"countdown": 0.0}):
        with pytest.raises(GlasslabError, match="mix of environments"):
            build_config({"rl": {"env": bad}})
