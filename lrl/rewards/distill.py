"""dUltra's distillation reward: how likely an autoregressive teacher finds each completion (spec §8.3).

The teacher is any local causal-LM checkpoint with its own tokenizer: prompt and completion are re-tokenized with
the teacher's tokenizer (separately, then concatenated, so the boundary does not depend on the text), and the
reward is the mean log-probability of the completion's tokens given the prompt and the tokens before them.
"""

from __future__ import annotations

import torch


def mean_completion_logprob(logits: torch.Tensor, input_ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Mean next-token log-prob over the completion positions of each row.

    Args:
        logits: (B, L, V) causal-LM logits (position t predicts token t + 1).
        input_ids: (B, L) long.
        completion: (B, L) bool, positions of completion tokens (never position 0).
    Returns:
        (B,) float32; 0 for a row without completion tokens.
    """
    if bool(completion[:, 0].any()):
        raise ValueError("a completion token at position 0 has no context to be predicted from")
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion[:, 1:].float()
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class TeacherScorer:
    """Scores completions with a causal-LM teacher loaded offline from a local checkpoint directory.

    Args:
        checkpoint: HF causal-LM directory (config.json, weights, tokenizer files).
        device, dtype: where and how to run the teacher (default CPU, float32).
        batch_size: sequences per forward.
    """

    def __init__(self, checkpoint: str, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"distillation teacher batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint, local_files_only=True, dtype=getattr(torch, dtype) if dtype else torch.float32
        ).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """(N,) float32 mean log-prob of each completion given its prompt (0 for an empty completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        tok = self.tokenizer
        rows = []
        for p, c in zip(prompts, completions):
            pi = tok(p, add_special_tokens=False).input_ids
            ci = tok(c, add_special_tokens=False).input_ids
            if not pi:  # a completion token needs context: start from the BOS (or pad) token
                pi = [tok.bos_token_id if tok.bos_token_id is not None else self.pad_id]
            rows.append((pi, ci))
        out = []
        dev = self.model.device
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            length = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), length), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            comp = torch.zeros(ids.shape, dtype=torch.bool)
            for i, (p, c) in enumerate(chunk):  # right padding: causal positions are unaffected by it
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                attn[i, : len(p) + len(c)] = 1
                comp[i, len(p) : len(p) + len(c)] = True
            logits = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits
            out.append(mean_completion_logprob(logits, ids.to(dev), comp.to(dev)).cpu())
        return torch.cat(out) if out else torch.zeros(0)
