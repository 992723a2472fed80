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


def layer_activation_bytes(shape: ModelShape, rows: int, positions: int, compute_bytes: int, sdpa_mask: bool,
                           lora_per_position: int = 0) -> int:
    """What one decoder layer keeps for its backward (module docstring); ``lora_per_position``: LoRA's change
    (`lora_layer_bytes_per_position`)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_pos = 4 * 6 * h + compute_bytes * (4 * i + 6 * q + 2 * kv) + 4 * (2 * shape.heads + shape.kv_heads + 2)
    mask = 4 * rows * positions * positions if sdpa_mask else 0
    return rows * positions * (per_pos + lora_per_position) + mask


def projections(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of a Qwen3 decoder layer's linear layers, by module name."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """Adapter parameters: rank × (in + out) per adapted projection and layer."""
    dims = projections(shape)
    return shape.layers * sum(rank * sum(dims[t]) for t in targets if t in dims)


def lora_layer_bytes_per_position(shape: ModelShape, rank: int, targets: list[str], dropout: float,
                                  compute_bytes: int, autocast: bool) -> int:
    """How LoRA (`lrl.models.lora`: frozen base, float32 adapters) changes one decoder layer's saved activations,
    per position (negative parts: what frozen weights no longer keep).

    The frozen norms' weight products keep nothing (−4·(2·H + q + kv): the two RMSNorms and QK-norm). Per adapted
    projection of ``in`` → ``out`` features: A's output (rank values, saved by B; float32, or the compute dtype
    under autocast); where activations are not float32, the adapter's copy of its input (peft casts it to the
    adapters' float32, autocast back to the compute dtype: ``in`` values saved by A); with dropout its mask
    (``in`` bytes) and its float32 output (``in`` values; under bf16 without autocast that output is the saved
    input itself).
    """
    h = shape.hidden
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    cast = 0 if compute_bytes == 4 else (compute_bytes if autocast else 4)
    out_b = compute_bytes if autocast else 4
    per = -4 * (2 * h + q + kv)
    for target in targets:
        n_in = projections(shape).get(target, (0, 0))[0]
        if not n_in:
            continue
        per += rank * out_b + n_in * cast
        if dropout > 0:  # its mask, and its float32 output (kept as well under autocast, measured)
            per += n_in * (1 + (4 if cast != 4 else 0))
    return per


def lora_inference_bytes(shape: ModelShape, rows: int, row: RowShape, targets: list[str], compute_bytes: int,
                         autocast: bool) -> int:
    """LoRA's extra transient in a no-grad forward: the widest adapted projection's B·A·x beside its base output."""
    widest = max((projections(shape).get(t, (0, 0))[1] for t in targets), default=0)
    return rows * row.positions * widest * (compute_bytes if autocast else 4)


def head_bytes(shape: ModelShape, targets: int, compute_bytes: int) -> int:
    """The output layer's part of one training forward+backward (chunked log-probs, `token_logprobs`)."""
    return targets * shape.hidden * compute_bytes + 3 * min(targets, HEAD_CHUNK) * shape.vocab * 4


def training_activation_bytes(shape: ModelShape, rows: int, row: RowShape, *, checkpointing: bool,
                              compute_bytes: int, residual_bytes: int, sdpa_mask: bool,
                              lora_per_position: int | None = None) -> int:
    """Peak activation bytes of one forward+backward chunk of ``rows`` packed rows (module docstring).
    ``lora_per_position``: LoRA's per-layer change (`lora_layer_bytes_per_position`); the frozen embeddings,
    final norm and output layer then keep no weight gradient and no final-norm product."""
    s = row.positions
    mask = rows * s * s if sdpa_mask else 0
    if lora_per_position is not None:
        return _lora_training_bytes(shape, rows, row, checkpointing, compute_bytes, residual_bytes, sdpa_mask,
                                    lora_per_position) + mask
    layer = layer_activation_bytes(shape, rows, s, compute_bytes, sdpa_mask)
    layers = shape.layers * rows * s * shape.hidden * residual_bytes + layer if checkpointing else shape.layers * layer
    extra = 3 * rows * s * shape.hidden * residual_bytes + shape.largest_param * 4
    return layers + mask + extra + head_bytes(shape, rows * row.targets, compute_bytes)


def _lora_training_bytes(shape: ModelShape, rows: int, row: RowShape, checkpointing: bool, compute_bytes: int,
                         residual_bytes: int, sdpa_mask: bool, lora_per_position: int) -> int:
    """`training_activation_bytes` with a frozen base: no weight gradient of the output layer (the head's
    backward holds two chunks of logits, not three, and no V × H accumulator); with checkpointing the head's
    chunks and the recomputed layer (plus its incoming gradient) are alive at different times."""
    s, res = row.positions, rows * row.positions * shape.hidden * residual_bytes
    layer = layer_activation_bytes(shape, rows, s, compute_bytes, sdpa_mask, lora_per_position)
    m = rows * row.targets
    head = m * shape.hidden * compute_bytes + 2 * min(m, HEAD_CHUNK) * shape.vocab * 4
    if checkpointing:
        return shape.layers * res + max(layer + res, head) + 2 * res
    return shape.layers * layer + 2 * res + head


def inference_activation_bytes(shape: ModelShape, rows: int, row: RowShape, *, compute_bytes: int,
                               residual_bytes: int, sdpa_mask: bool, lora_bytes: int = 0) -> int:
    """Peak of one no-grad forward (old / reference log-probs): nothing is kept for a backward, so one layer's
    larger phase is live at a time: attention (q/k/v, RoPE outputs and the float mask) or the MLP (gate, up,
    product), then the output layer's chunk of logits, beside the residual stream. ``lora_bytes``: LoRA's
    transient inside a layer (`lora_inference_bytes`)."""
    s, m = row.positions, rows * row.targets
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = rows * s * (3 * q + 3 * kv) * compute_bytes + (4 * rows * s * s if sdpa_mask else 0)
    mlp = 3 * rows * s * shape.intermediate * compute_bytes
    mask = rows * s * s if sdpa_mask else 0
    head = min(m, HEAD_CHUNK) * shape.vocab * 4 + m * shape.hidden * compute_bytes
    return 3 * rows * s * shape.hidden * residual_bytes + max(mask + max(attention, mlp) + lora_bytes, head)


def kv_cache_bytes(shape: ModelShape, rows: int, prompt: int, max_new: int, block: int, dtype_bytes: int,
                   budget_gb: float | None) -> int:
    """The rollout KV cache: the configured budget, else ``rows`` rows at the whole generation budget."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    return rows * blocks(prompt + max_new, block) * shape.kv_bytes_per_token * dtype_bytes
