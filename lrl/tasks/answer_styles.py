"""Answer styles of the synthetic task: the same worked steps written in layouts that decode with different
parallelism under threshold unmasking (issue #12: parallelism as a learnable choice).

Every style writes the same chain of operations, one step per previous result, and ends in ``\\boxed{N}``, so all
styles need the same computation per token and are scored by the same math verifier. They differ only in layout:

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
STYLE_NAMES: tuple[str, ...] = tuple(STEP_RENDERERS)

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
    if style not in STEP_RENDERERS:
        raise ValueError(f"unknown answer style {style!r}; available: {', '.join(STYLE_NAMES)}")
    return " ".join(STEP_RENDERERS[style](tuple(op), k) for k, op in enumerate(ops)) + f" \\boxed{{{result}}}"


def classify_style(text: str) -> str:
    """The style ``text`` is written in (``chain``, ``padded``, ``spaced``, ``ans``), or ``"other"``.

    Only the layout is checked, not the arithmetic. Surrounding whitespace is ignored. A response whose numbers are
    all two-digit reads the same in ``chain`` and ``padded``; it counts as ``chain`` (the padded style is told by
    its leading zeros).
    """
    text = text.strip()
    if _PATTERNS["padded"].fullmatch(text) and re.search(r"(?:^|[^\d])0\d", text):
        return "padded"
    for style in ("chain", "spaced", "ans"):
        if _PATTERNS[style].fullmatch(text):
            return style
    return OTHER


_LEADING_ZERO = re.compile(r"(?<!\d)0(\d)")


def other_kind(text: str) -> str:
    """Why a response is ``"other"``: ``"mixed"`` when it is a well-formed chain once the padding is dropped and
    every ``ans`` is replaced by the result it names (it mixes the layouts of two styles), else ``"malformed"``
    (characters doubled, dropped or misplaced, what unmasking neighbouring positions together produces). Only
    meaningful for responses `classify_style` calls ``"other"``."""
    return "mixed" if classify_style(_resolve_ans(_LEADING_ZERO.sub(r"\1", text))) == "chain" else "malformed"


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


def answer_roles(text: str) -> list[str]:
    """The role of every character of ``text`` (any style): ``operand`` (a number copied from the question: the
    first step's left operand and every right operand), ``carried`` (a copy of an earlier result: later steps'
    left operands and the boxed value), ``result`` (a computed step result), ``layout`` (everything else:
    symbols, separators, spaces, ``\\boxed{}``). Characters of text that is not a worked chain count as layout."""
    roles = ["layout"] * len(text)
    for k, m in enumerate(_STEP.finditer(text)):
        left = "layout" if m.group(1) == "ans" else "carried" if k else "operand"
        for group, role in ((1, left), (2, "operand"), (3, "result")):
            roles[m.start(group):m.end(group)] = [role] * (m.end(group) - m.start(group))
    boxed = _BOXED_VALUE.search(text)
    if boxed:
        roles[boxed.start(1):boxed.end(1)] = ["carried"] * (boxed.end(1) - boxed.start(1))
    return roles


def dependency_levels(text: str) -> list[int]:
    """For every character of ``text``, how many chained computations precede knowing it: a lower-bound model of
    decoding in which one forward can compute one step of the chain (and copy what is already known), but not two
    chained steps at once.

    A step's result is level ``k`` for the ``k``-th step (0-based: the first step's operands are all in the
    question, so its result can be computed in the first forward); a copy of a result (the next step's left
    operand, the boxed value) has the level of that result; operands copied from the question and the layout are
    level 0. Where the layout's position depends on a result's digit count (unpadded styles) it is not counted:
    on the synthetic task it never changes the floor (`forward_floor`), because the next result in the same block
    is at a higher level anyway. Characters of text that is not a worked chain are level 0.
    """
    levels = [0] * len(text)
    steps = list(_STEP.finditer(text))
    for k, m in enumerate(steps):
        levels[m.start(3):m.end(3)] = [k] * (m.end(3) - m.start(3))
        if k and m.group(1) != "ans":
            levels[m.start(1):m.end(1)] = [k - 1] * (m.end(1) - m.start(1))
    boxed = _BOXED_VALUE.search(text)
    if boxed and steps:
        levels[boxed.start(1):boxed.end(1)] = [len(steps) - 1] * (boxed.end(1) - boxed.start(1))
    return levels


def forward_floor(levels: Sequence[int], prompt_len: int, block_size: int, length: int | None = None) -> int:
    """The fewest forwards block-wise decoding can take for a response whose characters have ``levels``
    (`dependency_levels`) and that is ``length`` tokens long (default: one token per character; positions past the
    text, e.g. end-of-text tokens, get the highest level: where the text ends is known last), under the
    one-step-per-forward model: blocks are decoded in order (aligned to absolute positions, so the first may be
    partial), every block takes at least one forward, and a block whose highest level is ``L`` after earlier
    blocks reached ``R`` takes ``L − R`` forwards (each forward resolves one more level).
    Measured decoders sit above it; the gap is what sharper confidence could still win.
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
    forwards, resolved = 0, -1
    for b in sorted(top):
        forwards += max(1, top[b] - resolved)
        resolved = max(resolved, top[b])
    return forwards
