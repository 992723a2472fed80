"""dUltra's unmasking planner head: p_i = P(unmask i | x_t) from the backbone's final hidden states (spec §8.3).

A small MLP applied per position to the final hidden state that predicts the position's token (the same state
the output layer reads, so logit shift is handled by the caller), optionally joined by the position's current
confidence: the largest softmax probability of its logits at T = 1. That feature is a deterministic function of
the state x_t (unlike the drawn token's probability), so training can recompute it exactly from a recorded
trajectory; it is detached (the planner's gradient reaches the backbone through the hidden states only).

On disk the head is its own file next to the checkpoint, ``planner_head.safetensors``, plus a ``planner_head``
entry in config.json holding `PlannerConfig`. transformers' loaders read only ``model*.safetensors`` and keep
unknown config keys as plain attributes, so a checkpoint with a head still loads anywhere, and one without a head
loads with ``lm.planner = None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

PLANNER_FILE = "planner_head.safetensors"
PLANNER_CONFIG_KEY = "planner_head"


@dataclass
class PlannerConfig:
    """Shape of the planner head.

    Args:
        hidden_size: the backbone's hidden size (input width).
        inner_size: width of the MLP's hidden layer.
        use_confidence: append the position's max softmax probability (T = 1) to the input.
        init_bias: bias of the output unit at initialisation: every position starts at p = sigmoid(init_bias).
    """

    hidden_size: int
    inner_size: int = 64
    use_confidence: bool = True
    init_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"planner_head.hidden_size must be >= 1, got {self.hidden_size}")
        if self.inner_size < 1:
            raise ValueError(f"planner_head.inner_size must be >= 1, got {self.inner_size}")


class PlannerHead(nn.Module):
    """Per-position unmasking logit: Linear(H [+1] → inner) → SiLU → Linear(inner → 1), plus conf_skip · feature.

    The optional confidence feature is (log confidence − conf_shift) · conf_scale (buffers, saved with the head).
    """

    def __init__(self, config: PlannerConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.hidden_size + int(config.use_confidence), config.inner_size)
        self.fc2 = nn.Linear(config.inner_size, 1)
        # a direct, monotone path from the confidence feature: "more confident → more likely unmasked" (the
        # threshold rule imitation starts from) needs no MLP capacity and cannot be overfitted away
        self.conf_skip = nn.Parameter(torch.zeros(())) if config.use_confidence else None
        # the confidence enters as a standardised log-probability; imitation sets shift/scale from its data, so a
        # threshold between nearby confidences is a well-conditioned problem for the MLP
        self.register_buffer("conf_shift", torch.zeros(()))
        self.register_buffer("conf_scale", torch.ones(()))
        with torch.no_grad():  # start at p = sigmoid(init_bias) everywhere; the MLP's output starts at zero
            self.fc2.weight.zero_()
            self.fc2.bias.fill_(config.init_bias)

    def forward(self, states: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        """Unmasking logits.

        Args:
            states: (M, H) final hidden states predicting the M positions.
            confidence: (M,) max softmax probability of each position's logits (T = 1); required when the config
                uses it, detached here.
        Returns:
            (M,) float32 logits; p = sigmoid(logits).
        """
        x = states.to(self.fc1.weight.dtype)
        if self.config.use_confidence:
            if confidence is None:
                raise ValueError("this planner head uses the confidence feature; pass confidence")
            feat = (confidence.detach().float().clamp_min(1e-12).log() - self.conf_shift) * self.conf_scale
            x = torch.cat([x, feat.to(x.dtype)[:, None]], dim=-1)
        out = self.fc2(nn.functional.silu(self.fc1(x))).squeeze(-1).float()
        return out + self.conf_skip.float() * feat if self.conf_skip is not None else out


def planner_confidence(logits: torch.Tensor) -> torch.Tensor:
    """(M, V) logits → (M,) max softmax probability at T = 1 (the planner's confidence feature), no gradient."""
    with torch.no_grad():
        return logits.float().softmax(-1).amax(-1)


def save_planner(head: PlannerHead, directory: str | Path) -> dict:
    """Write ``planner_head.safetensors`` into ``directory``; return the config.json entry to store beside it."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(Path(directory) / PLANNER_FILE))
    return asdict(head.config)


def load_planner(directory: str | Path, raw_config: dict, *, device=None, dtype=None) -> PlannerHead | None:
    """The planner head of a checkpoint directory, or None when its config.json has no ``planner_head`` entry."""
    entry = raw_config.get(PLANNER_CONFIG_KEY)
    if entry is None:
        return None
    weights = Path(directory) / PLANNER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: config.json has a planner_head entry but {PLANNER_FILE} is missing")
    from safetensors.torch import load_file

    head = PlannerHead(PlannerConfig(**entry))
    head.load_state_dict(load_file(str(weights)))
    return head.to(device=device, dtype=dtype)
