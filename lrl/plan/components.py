"""Per-rank memory of each part of an RL step, as pure functions of the shape and the knobs (bytes; issue 28).

The figures model the code as it runs (`lrl.module`, `lrl.algorithms.logprobs`, `datamodules.rollout`); the
training-activation figures are checked against measured peaks on CPU (tests/test_plan.py, ``LiveTensorBytes``).

Training forward of one chunk (R packed rows of S positions each, `lrl.algorithms.logprobs.forward_tokens`):
a Qwen3 decoder layer keeps, per position, 6·H values in float32 (the RMSNorm inputs and outputs and the residual
adds: the norms compute in float32 under autocast), 4·I + 6·q + 2·kv values in the compute dtype (MLP gate, up,
SiLU, product; q/k/v projections, QK-norm, RoPE, attention output), about 2·heads + kv_heads + 2 float32
statistics, and under SDPA with a boolean mask an S × S float mask per row and layer (none with flex_attention's
block mask on CUDA). Gradient checkpointing keeps only each layer's input (R·S·H in the residual dtype) and
recomputes one layer at a time. Beyond the layers: the boolean mask (R·S² bytes, SDPA), about 3·R·S·H residual
values (embedding output, final norm, gradients flowing back), the output layer's chunked log-probs (at most
256 targets × V float32 logits, three buffers in the backward) and the incoming gradient of the largest
parameter (the output layer's float32 weight gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lrl.plan.shapes import ModelShape

HEAD_CHUNK = 256  # lrl.algorithms.token_logprobs.DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class RowShape:
    """One packed training row: ``positions`` run through the decoder, ``targets`` scored, ``copies`` noisy copies."""

    positions: int
    targets: int
    copies: int


def blocks(n: int, block: int) -> int:
    return -(-n // block) * block


def training_row(estimator: str, prompt: int, response: int, block: int, max_copies: int,
                 rounds: int, model_block: int) -> tuple[RowShape, int]:
    """The longest packed row of a response of ``response`` tokens after ``prompt`` (worst case: the budget) and
    the number of rows it needs. ``rounds``: most distinct denoising steps in a block (≤ block size)."""
    length = prompt + response
    if estimator == "single_pass":
        width = blocks(length - prompt // model_block * model_block, model_block)
        return RowShape(length + width, response, 1), 1
    start = prompt // block * block
    width = blocks(length - start, block)
    copies = min(max_copies, rounds)
    n_rows = math.ceil(rounds / max_copies)
    # trajectory: each token is a target once; masked_states: in every state of its block it is masked in
    targets = response if estimator == "trajectory" else response * (rounds + 1) // 2
    per_row = math.ceil(targets / n_rows)
    return RowShape(copies * width + length, per_row, copies), n_rows


def layer_activation_bytes(shape: ModelShape, rows: int, positions: int, compute_bytes: int, sdpa_mask: bool) -> int:
    """What one decoder layer keeps for its backward (module docstring)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_pos = 4 * 6 * h + compute_bytes * (4 * i + 6 * q + 2 * kv) + 4 * (2 * shape.heads + shape.kv_heads + 2)
    mask = 4 * rows * positions * positions if sdpa_mask else 0
    return rows * positions * per_pos + mask


def head_bytes(shape: ModelShape, targets: int, compute_bytes: int) -> int:
    """The output layer's part of one training forward+backward (chunked log-probs, `token_logprobs`)."""
    return targets * shape.hidden * compute_bytes + 3 * min(targets, HEAD_CHUNK) * shape.vocab * 4


def training_activation_bytes(shape: ModelShape, rows: int, row: RowShape, *, checkpointing: bool,
                              compute_bytes: int, residual_bytes: int, sdpa_mask: bool) -> int:
    """Peak activation bytes of one forward+backward chunk of ``rows`` packed rows (module docstring)."""
    s = row.positions
    layer = layer_activation_bytes(shape, rows, s, compute_bytes, sdpa_mask)
    layers = shape.layers * rows * s * shape.hidden * residual_bytes + layer if checkpointing else shape.layers * layer
    mask = rows * s * s if sdpa_mask else 0
    extra = 3 * rows * s * shape.hidden * residual_bytes + shape.largest_param * 4
    return layers + mask + extra + head_bytes(shape, rows * row.targets, compute_bytes)


def inference_activation_bytes(shape: ModelShape, rows: int, row: RowShape, *, compute_bytes: int,
                               residual_bytes: int, sdpa_mask: bool) -> int:
    """Peak of one no-grad forward (old / reference log-probs): nothing is kept for a backward, so one layer's
    larger phase is live at a time: attention (q/k/v, RoPE outputs and the float mask) or the MLP (gate, up,
    product), then the output layer's chunk of logits, beside the residual stream."""
    s, m = row.positions, rows * row.targets
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = rows * s * (3 * q + 3 * kv) * compute_bytes + (4 * rows * s * s if sdpa_mask else 0)
    mlp = 3 * rows * s * shape.intermediate * compute_bytes
    mask = rows * s * s if sdpa_mask else 0
    head = min(m, HEAD_CHUNK) * shape.vocab * 4 + m * shape.hidden * compute_bytes
    return 3 * rows * s * shape.hidden * residual_bytes + max(mask + max(attention, mlp), head)


def kv_cache_bytes(shape: ModelShape, rows: int, prompt: int, max_new: int, block: int, dtype_bytes: int,
                   budget_gb: float | None) -> int:
    """The rollout KV cache: the configured budget, else ``rows`` rows at the whole generation budget."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    return rows * blocks(prompt + max_new, block) * shape.kv_bytes_per_token * dtype_bytes
