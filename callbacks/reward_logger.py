"""`RewardNormalizationLogger`: what the decoupled reward normalisation did to this step's batch."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override


class RewardNormalizationLogger(Callback):
    """Logs raw and normalised per-reward statistics, zero-std fraction, within-group advantage collapse, a TPF
    histogram and sample completions (TensorBoard text), from the batch the module just trained on.

    Keys: ``reward/<name>/{min,max}`` (mean/std come with every batch), ``reward/frac_zero_std``,
    ``adv/collapse@<tau>``, ``adv/{mean,std}``; histograms ``tpf`` and ``adv``; text ``samples``.

    Args:
        every_n_steps: logging period in RL steps.
        num_samples: completions written as text each time (0 disables).
        collapse_taus: thresholds τ of the collapse ratio (fraction of within-group pairs with |ΔA| < τ).
    """

    def __init__(
        self, every_n_steps: int = 1, num_samples: int = 4, collapse_taus: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5)
    ):
        if every_n_steps < 1 or num_samples < 0:
            raise MisconfigurationException(
                f"RewardNormalizationLogger: every_n_steps must be >= 1 and num_samples >= 0, got {every_n_steps}, "
                f"{num_samples}"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.collapse_taus = tuple(collapse_taus)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        b = getattr(pl_module, "last_batch", None)
        if b is None or len(b) == 0 or pl_module.rl_step % self.every_n_steps:
            return
        from lrl.algorithms.advantages import collapse_ratio

        metrics = {}
        for name, v in b.rewards.items():
            metrics[f"reward/{name}/min"] = float(v.min())
            metrics[f"reward/{name}/max"] = float(v.max())
        total = b.rewards.get("total")
        if total is not None:
            stds = [float(total[b.group_index == g].std(unbiased=False)) for g in range(b.num_groups)]
            metrics["reward/frac_zero_std"] = sum(s < 1e-6 for s in stds) / max(len(stds), 1)
        if b.advantages is not None:
            metrics["adv/mean"] = float(b.advantages.mean())
            metrics["adv/std"] = float(b.advantages.std()) if len(b) > 1 else 0.0
            for tau, frac in collapse_ratio(b.advantages, b.group_index, self.collapse_taus).items():
                metrics[f"adv/collapse@{tau:g}"] = float(frac)
        pl_module.log_dict(metrics, on_step=True, batch_size=len(b))
        exp = getattr(trainer.logger, "experiment", None)
        step = trainer.global_step
        if exp is not None and hasattr(exp, "add_histogram"):
            exp.add_histogram("tpf", b.tpf, step)
            if b.advantages is not None:
                exp.add_histogram("adv", b.advantages, step)
        if exp is not None and hasattr(exp, "add_text") and self.num_samples:
            lines = []
            for i in range(min(self.num_samples, len(b))):
                prompt = b.prompts[int(b.group_index[i])] if b.prompts else ""
                acc = float(b.accuracy[i]) if b.accuracy is not None else float("nan")
                lines.append(
                    f"**prompt** `{prompt!r}`  \n**response** `{b.texts[i]!r}`  \n"
                    f"acc {acc:.2f} · TPF {float(b.tpf[i]):.2f} · forwards {int(b.num_forwards[i])}"
                )
            exp.add_text("samples", "\n\n---\n\n".join(lines), step)
