"""Answer styles of the synthetic task: the same worked steps written in layouts that decode with different
parallelism under threshold unmasking (issue #12: parallelism as a learnable choice).

Every style writes the same operations and ends in ``\\boxed{N}``, so all styles need the same computation per token
and are scored by the same math verifier. The first four write the chain one step per previous result and differ
only in layout:

``chain`` (the original task)::

    9*9=81. 81+5=86. \\boxed{86}

  Numbers are written without padding, so the position of every character after a computed number depends on how
  many digits that number has. A small model that has not yet committed to ``81`` cannot be sure where ``+5=``
  goes, so copied operands and symbols wait for the results before them: roughly one forward per dependency,
  plus the positions whose alignment is unsure.

``padded`` (fixed width)::

    09*09=81. 81+05=86. \\boxed{86}

  Every number of the steps is written with two digits (all values are ≤ 99), so each step occupies the same
  9 characters and the layout is known before any value is computed: operands copied from the question, the
  symbols and the separators can be unmasked together in the first forward of a block, and only the computed
  digits wait for their inputs. It is 1–6 characters longer than ``chain`` (a leading zero per one-digit number),
  which is why benchmarks report forwards per response next to TPF: the gain must show up as fewer forwards.
  Measured, this hypothesis failed on the 0.4 M-parameter base: ``padded`` answers take more forwards than
  ``chain`` ones even when both styles are trained equally (9.2 vs 8.2 at φ 0.9), because operands copied from the
  question, now 7 characters instead of 5, are not unmasked with the layout but wait for the model to locate them
  (``scripts/forward_anatomy.py``; README, "The multi-style task").

``spaced``::

    9 * 9 = 81. 81 + 5 = 86. \\boxed{86}

  Spaces around every symbol: longer, and no more parallel than ``chain`` (the alignment problem is unchanged). A
  prototype found it less accurate and dropped by RL; it is kept for comparison.

``ans``::

    9*9=81. ans+5=86. \\boxed{86}

  Later steps name the previous result ``ans`` instead of copying it, so no copy waits for the result it copies:
  the same computation with fewer dependent characters, 1–2 characters longer per step. Measured on a base
  trained on a 50/50 ``chain``/``ans`` mix: as accurate as ``chain`` and faster on average (8.86 against 9.00
  forwards, greedy φ 0.9), but not inside a problem (``scripts/group_anatomy.py``: +0.15 forwards against the
  ``chain`` answers of the same group): where ``ans`` goes is where the two styles part, and the model waits to
  decide it (its layout characters are unmasked alone 1.25 times per answer, ``chain``'s 0.71).

``pairs`` (only for sums of four numbers, ``SyntheticArithmetic(family="sums")``)::

    12+7=19. 5+9=14. 19+14=33. \\boxed{33}      (chain: 12+7=19. 19+5=24. 24+9=33. \\boxed{33})

  The same three additions of the same numbers, grouped as two partial sums and their total instead of a running
  total. The two partial sums only need numbers of the question, so they can be computed in the same forward:
  two dependent steps instead of three, at the same length (±2 characters: the second partial sum and the
  second running total may differ in digits). Unlike the layouts above, the styles differ in the dependency
  structure of the computation, not in where its characters go. Measured on the base trained for it
  (``outputs/base/styles_pairs_b16``, greedy φ = 0.9): 10.1 forwards per ``pairs`` answer against 11.9 per
  ``chain`` one at the same 39.6 characters, and 0.66 fewer inside a problem (``scripts/group_anatomy.py``,
  paired correct answers of 28 groups): the first style of this task that is faster where the TPF reward compares.

`classify_style` tells which style a response used (``"other"`` for anything else, which `other_kind` splits into
layouts mixing two styles and malformed text; on the committed base nearly all are malformed); the padded style
is recognised by its leading zeros, so problems in multi-style tasks always contain a one-digit number (see
`SyntheticArithmetic`). The measured forwards per style are in the README.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Op = tuple[int, str, int, int]  # (left operand, symbol, right operand, result)

OTHER = "other"


def _chain(op: Op, k: int) -> str:
    left, symbol, right, result = op
    return f"{left}{symbol}{right}={result}."


def _padded(op: Op, k: int) -> str:
    left, symbol, right, result = op
    return f"{left:02d}{symbol}{right:02d}={result:02d}."


def _spaced(op: Op, k: int) -> str:
    left, symbol, right, result = op
    return f"{left} {symbol} {right} = {result}."


def _ans(op: Op, k: int) -> str:
    left, symbol, right, result = op
    return f"{left}{symbol}{right}={result}." if k == 0 else f"ans{symbol}{right}={result}."


STEP_RENDERERS: dict[str, Callable[[Op, int], str]] = {"chain": _chain, "padded": _padded, "spaced": _spaced,
                                                       "ans": _ans}
LAYOUT_STYLES: tuple[str, ...] = tuple(STEP_RENDERERS)  # any chain of steps can be written in these
PAIRS = "pairs"  # restructures the steps of a sum of four numbers rather than re-laying each one out
STYLE_NAMES: tuple[str, ...] = (*LAYOUT_STYLES, PAIRS)


def pairs_steps(ops: Sequence[Op]) -> list[Op]:
    """The ``pairs`` steps of a running sum of four numbers ``a+b+c+d``: ``a+b``, ``c+d``, then the two partial
    sums. ``ops`` are its ``chain`` steps (three chained additions)."""
    ops = [tuple(op) for op in ops]
    if len(ops) != 3 or any(op[1] != "+" for op in ops) or ops[1][0] != ops[0][3] or ops[2][0] != ops[1][3]:
        raise ValueError(f"style 'pairs' needs a sum of four numbers (three chained additions), got steps {ops}")
    (a, _, b, p), (_, _, c, _), (_, _, d, total) = ops
    return [(a, "+", b, p), (c, "+", d, c + d), (p, "+", c + d, total)]

_NUM = r"(?:0|[1-9]\d?)"  # a value in [0, 99] without padding
_SYM = r"[+\-*]"
_BOX = r"\\boxed\{\d+\}"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "padded": re.compile(rf"(?:\d\d{_SYM}\d\d=\d\d\. )+{_BOX}"),
    "chain": re.compile(rf"(?:{_NUM}{_SYM}{_NUM}={_NUM}\. )+{_BOX}"),
    "spaced": re.compile(rf"(?:{_NUM} {_SYM} {_NUM} = {_NUM}\. )+{_BOX}"),
    "ans": re.compile(rf"{_NUM}{_SYM}{_NUM}={_NUM}\. (?:ans{_SYM}{_NUM}={_NUM}\. )+{_BOX}"),
}


def render_answer(style: str, ops: Sequence[Op], result: int) -> str:
    """The response of ``style`` for the worked steps ``ops``: steps, then ``\\boxed{result}``."""
    if style not in STYLE_NAMES:
        raise ValueError(f"unknown answer style {style!r}; available: {', '.join(STYLE_NAMES)}")
    if style == PAIRS:
        style, ops = "chain", pairs_steps(ops)
    return " ".join(STEP_RENDERERS[style](tuple(op), k) for k, op in enumerate(ops)) + f" \\boxed{{{result}}}"


def classify_style(text: str) -> str:
    """The style ``text`` is written in (``chain``, ``padded``, ``spaced``, ``ans``), or ``"other"``.

    Only the layout is checked, not the arithmetic; ``pairs`` is a ``chain`` layout whose third step adds the first
    two results and whose second step does not start from the first result. Surrounding whitespace is ignored. A
    response whose numbers are all two-digit reads the same in ``chain`` and ``padded``; it counts as ``chain`` (the
    padded style is told by its leading zeros).
    """
    text = text.strip()
    if _PATTERNS["padded"].fullmatch(text) and re.search(r"(?:^|[^\d])0\d", text):
        return "padded"
    if _PATTERNS["chain"].fullmatch(text):
        return PAIRS if _is_pairs(list(_STEP.finditer(text))) else "chain"
    for style in ("spaced", "ans"):
        if _PATTERNS[style].fullmatch(text):
            return style
    return OTHER


_LEADING_ZERO = re.compile(r"(?<!\d)0(\d)")


def other_kind(text: str) -> str:
    """Why a response is ``"other"``: ``"mixed"`` when it is a well-formed chain once the padding is dropped and
    every ``ans`` is replaced by the result it names (it mixes the layouts of two styles), else ``"malformed"``
    (characters doubled, dropped or misplaced, what unmasking neighbouring positions together produces). Only
    meaningful for responses `classify_style` calls ``"other"``."""
    resolved = classify_style(_resolve_ans(_LEADING_ZERO.sub(r"\1", text)))
    return "mixed" if resolved in ("chain", PAIRS) else "malformed"


def _resolve_ans(text: str) -> str:
    """``text`` with each step's ``ans`` replaced by the previous step's result (left alone in a first step)."""
    parts, pos, previous = [], 0, None
    for m in _STEP.finditer(text):
        if m.group(1) == "ans" and previous is not None:
            parts += [text[pos:m.start(1)], previous]
            pos = m.end(1)
        previous = m.group(3)
    return "".join(parts) + text[pos:]


def distinguishable(ops: Sequence[Op]) -> bool:
    """True when the steps contain a one-digit number, so ``padded`` differs from ``chain``."""
    return any(v < 10 for left, _, right, result in ops for v in (left, right, result))


# Roles of the characters of an answer, for measuring which ones wait (scripts/forward_anatomy.py).
ROLES: tuple[str, ...] = ("operand", "carried", "result", "layout")
_STEP = re.compile(r"(\d+|ans)\s*[+\-*]\s*(\d+)\s*=\s*(\d+)\.")
_BOXED_VALUE = re.compile(r"\\boxed\{(\d+)\}")


def _is_pairs(steps: Sequence[re.Match[str]]) -> bool:
    """Whether the worked steps (`_STEP` matches) are laid out as ``pairs``: ``a+b=p. c+d=q. p+q=N.``"""
    return (len(steps) == 3 and steps[1].group(1) != steps[0].group(3)
            and (steps[2].group(1), steps[2].group(2)) == (steps[0].group(3), steps[1].group(3)))


def _step_inputs(steps: Sequence[re.Match[str]]) -> list[tuple[int | None, int | None]]:
    """For every step, which earlier step's result its left and right operands are (``None``: from the question).
    In every style but ``pairs``, step ``k > 0`` continues from step ``k − 1`` (written as a copy or as ``ans``)."""
    if _is_pairs(steps):
        return [(None, None), (None, None), (0, 1)]
    return [(k - 1 if k else None, None) for k in range(len(steps))]


def worked_steps_hold(text: str) -> bool:
    """Whether the worked steps of ``text`` are a consistent computation of its boxed answer: the layout is one of
    the styles (`classify_style` is not ``"other"``), every step's arithmetic holds, every carried number (a copy or
    ``ans``) equals the result it carries, and the boxed value is the last step's result. Numbers copied from the
    question are not checked (the text alone does not have them); the final answer is the verifier's job.

    A correct box over garbled steps is what threshold decoding produces when neighbouring positions are unmasked
    together, and a reward that reads only the box pays for it (README, "Sums of four amounts").
    """
    if classify_style(text) == OTHER:
        return False
    text = text.strip()
    steps = list(_STEP.finditer(text))
    results: list[int] = []
    for m, inputs in zip(steps, _step_inputs(steps)):
        left = results[-1] if m.group(1) == "ans" else int(m.group(1))
        right, result = int(m.group(2)), int(m.group(3))
        if any(source is not None and value != results[source] for source, value in zip(inputs, (left, right))):
            return False
        symbol = text[m.end(1):m.start(2)].strip()
        if {"+": left + right, "-": left - right, "*": left * right}[symbol] != result:
            return False
        results.append(result)
    boxed = _BOXED_VALUE.search(text)
    return bool(results) and boxed is not None and int(boxed.group(1)) == results[-1]


def answer_roles(text: str) -> list[str]:
    """The role of every character of ``text`` (any style): ``operand`` (a number copied from the question),
    ``carried`` (a copy of an earlier result: in ``chain`` later steps' left operands, in ``pairs`` both operands
    of the last step, and the boxed value), ``result`` (a computed step result), ``layout`` (everything else:
    symbols, separators, spaces, ``ans``, ``\\boxed{}``). Characters of text that is not a worked chain count as
    layout."""
    roles = ["layout"] * len(text)
    steps = list(_STEP.finditer(text))
    for m, inputs in zip(steps, _step_inputs(steps)):
        left = "layout" if m.group(1) == "ans" else "operand" if inputs[0] is None else "carried"
        right = "operand" if inputs[1] is None else "carried"
        for group, role in ((1, left), (2, right), (3, "result")):
            roles[m.start(group):m.end(group)] = [role] * (m.end(group) - m.start(group))
    boxed = _BOXED_VALUE.search(text)
    if boxed:
        roles[boxed.start(1):boxed.end(1)] = ["carried"] * (boxed.end(1) - boxed.start(1))
    return roles


def dependency_levels(text: str) -> list[int]:
    """For every character of ``text``, how many dependent computations it takes to know it: a lower-bound model
    of decoding in which one forward can compute a step whose inputs are visible (and copy what is already known),
    but not two dependent steps at once.

    Operands copied from the question, ``ans`` and the layout are level 0 (known without computing); a step whose
    operands all come from the question is level 1 (computable in the first forward); a step that uses earlier
    results is one level above the highest of them (in a chain the ``k``-th step, 1-based, is level ``k``; in
    ``pairs`` the two partial sums are both level 1 and the last step level 2); a copy of a result (a later
    operand, the boxed value) has the level of that result. Where the layout's position depends on a result's digit
    count (unpadded styles) it is not counted. Characters of text that is not a worked chain are level 0.
    """
    levels = [0] * len(text)
    steps = list(_STEP.finditer(text))
    step_level: list[int] = []
    for m, inputs in zip(steps, _step_inputs(steps)):
        step_level.append(1 + max((step_level[j] for j in inputs if j is not None), default=0))
        levels[m.start(3):m.end(3)] = [step_level[-1]] * (m.end(3) - m.start(3))
        for group, source in zip((1, 2), inputs):
            if source is not None and m.group(group) != "ans":
                levels[m.start(group):m.end(group)] = [step_level[source]] * (m.end(group) - m.start(group))
    boxed = _BOXED_VALUE.search(text)
    if boxed and steps:
        levels[boxed.start(1):boxed.end(1)] = [step_level[-1]] * (boxed.end(1) - boxed.start(1))
    return levels


def forward_floor(levels: Sequence[int], prompt_len: int, block_size: int, length: int | None = None) -> int:
    """The fewest forwards block-wise decoding can take for a response whose characters have ``levels``
    (`dependency_levels`) and that is ``length`` tokens long (default: one token per character; positions past the
    text, e.g. end-of-text tokens, get the highest level: where the text ends is known last), under the
    one-step-per-forward model: blocks are decoded in order (aligned to absolute positions, so the first may be
    partial), every block takes at least one forward, and a block whose highest level is ``L`` after earlier
    blocks committed values up to level ``R`` takes ``L − R`` forwards (each forward computes one more level).
    A block of question copies and layout commits no value: a result computed in the next block still costs its
    forward there. Measured decoders sit above it; the gap is what sharper confidence could still win.
    """
    if block_size < 1 or prompt_len < 0:
        raise ValueError(f"need block_size >= 1 and prompt_len >= 0, got {block_size} and {prompt_len}")
    levels = list(levels)
    if length is not None:
        levels = levels[:length] + [max(levels, default=0)] * (length - len(levels))
    top: dict[int, int] = {}
    for j, level in enumerate(levels):
        b = (prompt_len + j) // block_size
        top[b] = max(top.get(b, 0), level)
    forwards, resolved = 0, 0
    for b in sorted(top):
        forwards += max(1, top[b] - resolved)
        resolved = max(resolved, top[b])
    return forwards
