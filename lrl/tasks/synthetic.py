"""Synthetic arithmetic word problems: the embedded default task of the demo (no download, seconds to learn).

Problems chain 1–3 operations (+, −, ×) over small integers; every result is in [0, 99] and each step uses the
previous result, so a model that decodes several digits in parallel loses accuracy (the accuracy/TPF trade-off
LightningRL optimises). Records follow GSM8K (``answer`` = worked steps + ``#### N``) so they go through the same
math verifier as real datasets; the SFT target ends in ``\\boxed{N}`` like the responses RL rewards (spec §3.1).

Example::

    question: "Tom has 7 apples. He buys 5 more. He sells 3. How many now?"
    answer:   "7+5=12. 12-3=9. #### 9"
    target:   "7+5=12. 12-3=9. \\boxed{9}"

The ``sums`` family (``SyntheticArithmetic(family="sums")``) asks for the total of four people's amounts::

    question: "Liz has 14 cards. Ben has 15. Max has 3. Mia has 10. How many in all?"
    target:   "14+15=29. 29+3=32. 32+10=42. \\boxed{42}"      (chain: a running total)
              "14+15=29. 3+10=13. 29+13=42. \\boxed{42}"      (pairs: two partial sums, then their total)

Sizes (checked by the tests) suit a character-level model with block size ~8 and ~48 new tokens: questions
40–90 characters, targets 20–40 characters. The vocabulary is deliberately small.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lrl.tasks.answer_styles import (
    OTHER,
    PAIRS,
    STYLE_NAMES,
    classify_style,
    distinguishable,
    render_answer,
    worked_steps_hold,
)
from lrl.tasks.base import PLAIN_TEMPLATE, QUESTION_PLACEHOLDER, MathTask

MAX_VALUE = 99  # every operand and result stays in [0, MAX_VALUE]: at most two digits
MAX_ADDEND = 30  # largest number added or subtracted in one step
MAX_START = 40  # largest starting amount (when the problem does not start with a product)
MAX_FACTOR = 9  # largest factor of a starting product "a bags of b"
MAX_STEPS = 3  # keeps targets within MAX_TARGET_CHARS
MIN_QUESTION_CHARS, MAX_QUESTION_CHARS = 40, 90
MIN_TARGET_CHARS, MAX_TARGET_CHARS = 20, 40
FAMILIES = ("chains", "sums")

HE_NAMES = ("Tom", "Sam", "Max", "Ben")
SHE_NAMES = ("Ann", "Eva", "Mia", "Liz")
OBJECTS = ("apples", "pens", "cards", "eggs", "coins", "books")
CONTAINERS = ("bags", "boxes")
ADD_VERBS = ("buys", "finds", "gets")
SUB_VERBS = ("sells", "loses", "drops")
MUL_VERBS = {2: "doubles", 3: "triples"}

# Sentence templates. `{p}` is the pronoun; each operation sentence is one step of the worked answer.
START = "{name} has {a} {obj}."
START_PRODUCT = "{name} has {a} {box} of {b} {obj}."
ADD = "{p} {verb} {b} more."
SUB = "{p} {verb} {b}."
MUL = "{p} {verb} them."
ASK = "How many now?"
# The `sums` family: four people's amounts, added up (the first sentence is START).
SUM_NEXT = "{name} has {a}."
SUM_ASK = "How many in all?"
SUM_TERMS = 4
MAX_TERM = 24  # largest amount of one person (a total over 99 is redrawn)
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}


def _literal_chars(template: str) -> str:
    """The characters of a template outside its ``{placeholders}``."""
    return "".join(literal for literal, *_ in string.Formatter().parse(template))


def synthetic_char_set(prompt_template: str = PLAIN_TEMPLATE) -> str:
    """Every character a synthetic question, answer, target or prompt can contain, sorted, as one string.

    The character-level demo tokenizer is built from it.
    """
    words = [*HE_NAMES, *SHE_NAMES, "He", "She", *OBJECTS, *CONTAINERS, *ADD_VERBS, *SUB_VERBS, *MUL_VERBS.values()]
    templates = "".join(_literal_chars(t) for t in (START, START_PRODUCT, ADD, SUB, MUL, ASK,
                                                     SUM_NEXT, SUM_ASK))
    answer_chars = string.digits + "".join(_SYMBOLS.values()) + "=. #" + "\\boxed{}"
    prompt_chars = prompt_template.replace(QUESTION_PLACEHOLDER, "")
    return "".join(sorted(set("".join(words) + templates + answer_chars + prompt_chars)))


def _step_text(symbol: str, left: int, right: int, result: int) -> str:
    return f"{left}{symbol}{right}={result}."


def generate_problem(rng: random.Random, num_steps: int) -> dict[str, Any]:
    """One random problem with ``num_steps`` chained operations.

    Returns:
        ``{"question", "answer", "result", "num_steps", "ops"}``; ``answer`` is ``"<steps> #### <result>"`` and
        ``ops`` the steps as ``[left, symbol, right, result]`` lists (what `answer_styles` renders).
    """
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be in [1, {MAX_STEPS}], got {num_steps}")
    while True:  # rejection: at least one multi-digit result, so carries and two-digit numbers appear
        he = rng.random() < 0.5
        name = rng.choice(HE_NAMES if he else SHE_NAMES)
        pronoun = "He" if he else "She"
        obj = rng.choice(OBJECTS)
        sentences: list[str] = []
        steps: list[str] = []
        ops: list[list] = []
        results: list[int] = []
        if rng.random() < 1 / 3:
            # the first step is the starting product "a boxes of b"
            a, b = rng.randint(2, MAX_FACTOR), rng.randint(2, MAX_FACTOR)
            x = a * b
            sentences.append(START_PRODUCT.format(name=name, a=a, box=rng.choice(CONTAINERS), b=b, obj=obj))
            steps.append(_step_text("*", a, b, x))
            ops.append([a, "*", b, x])
            results.append(x)
        else:
            x = rng.randint(2, MAX_START)
            sentences.append(START.format(name=name, a=x, obj=obj))
        while len(steps) < num_steps:
            sentence, symbol, operand, new_x = _random_operation(rng, x, pronoun)
            sentences.append(sentence)
            steps.append(_step_text(symbol, x, operand, new_x))
            ops.append([x, symbol, operand, new_x])
            results.append(new_x)
            x = new_x
        if max(results) >= 10:
            break
    sentences.append(ASK)
    return {
        "question": " ".join(sentences),
        "answer": f"{' '.join(steps)} #### {x}",
        "result": x,
        "num_steps": num_steps,
        "ops": ops,
    }


def generate_sum_problem(rng: random.Random) -> dict[str, Any]:
    """One random ``sums`` problem: four people's amounts (2–24 each, total ≤ 99), asked for in all.

    Returns the record of `generate_problem`, its worked steps a running total (``chain``), e.g.
    ``"Tom has 12 pens. Ann has 7. Max has 5. Eva has 9. How many in all?"`` →
    ``"12+7=19. 19+5=24. 24+9=33. #### 33"``; the ``pairs`` style groups the same numbers as two partial sums.
    """
    while True:
        terms = [rng.randint(2, MAX_TERM) for _ in range(SUM_TERMS)]
        if sum(terms) <= MAX_VALUE:
            break
    names = rng.sample([*HE_NAMES, *SHE_NAMES], SUM_TERMS)
    sentences = [START.format(name=names[0], a=terms[0], obj=rng.choice(OBJECTS))]
    sentences += [SUM_NEXT.format(name=name, a=a) for name, a in zip(names[1:], terms[1:])]
    ops, x = [], terms[0]
    for a in terms[1:]:
        ops.append([x, "+", a, x + a])
        x += a
    return {
        "question": " ".join([*sentences, SUM_ASK]),
        "answer": f"{' '.join(_step_text('+', left, a, total) for left, _, a, total in ops)} #### {x}",
        "result": x,
        "num_steps": len(ops),
        "ops": ops,
    }


def _random_operation(rng: random.Random, x: int, pronoun: str) -> tuple[str, str, int, int]:
    """A random operation that keeps the result in [0, MAX_VALUE]: (sentence, symbol, operand, result)."""
    feasible = []
    if MAX_VALUE - x >= 2:
        feasible.append("add")
    if x >= 2:
        feasible.append("sub")
    if 2 * x <= MAX_VALUE and x >= 2:
        feasible.append("mul")
    op = rng.choice(feasible)  # never empty: x in [0, 99] always allows add or sub
    if op == "add":
        b = rng.randint(2, min(MAX_ADDEND, MAX_VALUE - x))
        return ADD.format(p=pronoun, verb=rng.choice(ADD_VERBS), b=b), "+", b, x + b
    if op == "sub":
        b = rng.randint(2, min(MAX_ADDEND, x))
        return SUB.format(p=pronoun, verb=rng.choice(SUB_VERBS), b=b), "-", b, x - b
    k = rng.choice([k for k in MUL_VERBS if k * x <= MAX_VALUE])
    return MUL.format(p=pronoun, verb=MUL_VERBS[k]), "*", k, x * k


@dataclass
class SyntheticArithmetic(MathTask):
    """Templated 1–3 step arithmetic word problems, deterministic given the seeds.

    Split ``"train"`` comes from ``train_seed``; ``"eval"`` and ``"test"`` (the same problems) from ``eval_seed``,
    with every question that also occurs in the train split removed. Questions are unique within a split.

    Answer styles (`lrl.tasks.answer_styles`): every record is assigned a style drawn with the weights of
    ``styles`` (stored as ``record["style"]``), which its SFT target is written in. With one style the task is the
    original single-style task, problem for problem. With several, problems whose styles would read the same are
    skipped (in ``chains`` every problem has a one-digit number), so the split differs from the single-style one;
    every style of every problem is a correct answer for the verifier.

    Problem families: ``chains`` (the original, 1–3 chained operations) and ``sums`` (four people's amounts added
    up, `generate_sum_problem`), the family of the ``pairs`` style: two partial sums computable together instead
    of a running total, one dependent step fewer at about the same length.

    Args:
        name: Registry name.
        prompt_template: Chat-free template with ``{question}`` (default ``"Q: {question}\\nA: "``).
        num_train: Train problems.
        num_eval: Eval/test problems.
        train_seed: Seed of the train split.
        eval_seed: Seed of the eval/test split.
        steps: Allowed numbers of operations of ``chains`` problems; each problem draws one uniformly (``sums``
            problems always have three).
        styles: Answer styles and their mixing weights (``chain``, ``padded``, ``spaced``, ``ans``, and ``pairs``
            for ``sums``), e.g. ``{"chain": 0.7, "padded": 0.3}``; weights need not sum to 1.
        family: Which problems: ``chains`` or ``sums``.
    """

    name: str = "synthetic"
    prompt_template: str = PLAIN_TEMPLATE
    num_train: int = 2000
    num_eval: int = 200
    train_seed: int = 0
    eval_seed: int = 1
    steps: tuple[int, ...] = (2, 3)
    styles: dict[str, float] = field(default_factory=lambda: {"chain": 1.0})
    family: str = "chains"
    _cache: dict[str, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        if not self.steps or any(not 1 <= s <= MAX_STEPS for s in self.steps):
            raise ValueError(
                f"{self.name}: steps must be a non-empty tuple of values in [1, {MAX_STEPS}], got {self.steps}"
            )
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError(f"{self.name}: num_train and num_eval must be >= 0, got {self.num_train}, {self.num_eval}")
        if self.train_seed == self.eval_seed:
            raise ValueError(f"{self.name}: train_seed and eval_seed must differ, both are {self.train_seed}")
        self.styles = {str(k): float(v) for k, v in dict(self.styles).items()}
        unknown = sorted(set(self.styles) - set(STYLE_NAMES))
        if unknown:
            raise ValueError(f"{self.name}: unknown styles {unknown}; available: {', '.join(STYLE_NAMES)}")
        if any(not w >= 0 for w in self.styles.values()) or sum(self.styles.values()) <= 0:
            raise ValueError(f"{self.name}: styles weights must be >= 0 with a positive sum, got {self.styles}")
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; available: {', '.join(FAMILIES)}")
        if self.family != "sums" and self.styles.get(PAIRS, 0) > 0:
            raise ValueError(f"{self.name}: style {PAIRS!r} needs family: sums (sums of four numbers)")
        if QUESTION_PLACEHOLDER not in self.prompt_template:
            raise ValueError(f"{self.name}: prompt_template must contain {QUESTION_PLACEHOLDER!r}")

    def load(self, split: str) -> list[dict[str, Any]]:
        """Records ``{"question", "answer", "result", "num_steps"}`` of ``split`` (train, eval or test)."""
        if split == "train":
            key, seed, count, exclude = "train", self.train_seed, self.num_train, frozenset()
        elif split in ("eval", "test"):
            train_questions = frozenset(r["question"] for r in self.load("train"))
            key, seed, count, exclude = "eval", self.eval_seed, self.num_eval, train_questions
        else:
            raise ValueError(f"{self.name}: unknown split {split!r}; expected 'train', 'eval' or 'test'")
        if key not in self._cache:
            self._cache[key] = self._generate(seed, count, exclude)
        return [dict(r) for r in self._cache[key]]  # copies: callers may annotate records

    def _generate(self, seed: int, count: int, exclude: frozenset[str]) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        names = [k for k, w in self.styles.items() if w > 0]
        weights = [self.styles[k] for k in names]
        multi = len(names) > 1
        seen = set(exclude)
        records: list[dict[str, Any]] = []
        max_attempts = 50 * count + 1000
        for _ in range(max_attempts):
            if len(records) == count:
                break
            if self.family == "sums":
                record = generate_sum_problem(rng)
                # every style must read as itself (e.g. `pairs` is not `chain` when the third amount is the first sum)
                apart = all(classify_style(render_answer(k, record["ops"], record["result"])) == k for k in names)
            else:
                record = generate_problem(rng, rng.choice(self.steps))
                apart = not multi or distinguishable(record["ops"])
            if record["question"] in seen or not apart:
                continue
            seen.add(record["question"])
            record["style"] = names[0] if not multi else rng.choices(names, weights)[0]
            records.append(record)
        if len(records) < count:
            raise ValueError(f"{self.name}: could only generate {len(records)} unique problems of {count} requested")
        return records

    @property
    def style_names(self) -> tuple[str, ...]:
        """The styles this task mixes (weight > 0), then ``"other"``: the categories of `response_style`."""
        return (*(k for k, w in self.styles.items() if w > 0), OTHER)

    def response_style(self, text: str) -> str:
        """The answer style of a completion (``chain``, ``padded``, ``spaced``, ``ans``, ``pairs``) or ``"other"``."""
        return classify_style(text)

    def worked_steps_hold(self, text: str) -> bool:
        """Whether a completion's worked steps are a consistent computation of its boxed answer
        (`lrl.tasks.answer_styles.worked_steps_hold`); the check behind ``data.require_worked_steps``."""
        return worked_steps_hold(text)

    def target_response(self, record: Mapping[str, Any]) -> str:
        """The SFT target in the record's style: the worked steps followed by ``\\boxed{N}``, e.g.
        ``"7+5=12. 12-3=9. \\boxed{9}"`` (chain) or ``"07+05=12. 12-03=09. \\boxed{9}"`` (padded)."""
        style = record.get("style", "chain")
        if record.get("ops") is not None and style != "chain":
            return render_answer(style, record["ops"], int(record["result"]))
        answer = str(record["answer"])
        if "####" not in answer:
            raise ValueError(f"{self.name}: answer {answer!r} has no '#### N' final answer")
        steps, final = answer.rsplit("####", 1)
        return f"{steps.strip()} \\boxed{{{final.strip()}}}"

    def char_set(self) -> str:
        """Every character of this task's prompts, answers and targets (sorted, no duplicates)."""
        return synthetic_char_set(self.prompt_template)
