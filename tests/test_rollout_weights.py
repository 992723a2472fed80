"""The rollout engine's weights cost no float32 copy (issue 28): a bf16 copy built tensor by tensor, measured."""

from __future__ import annotations

import torch

from lrl.models.sharding import cast_copy
from lrl.plan.measure import LiveTensorBytes


def test_cast_copy_allocates_only_the_bf16_copy_and_matches_the_policy(tiny_lm):
    params = sum(p.numel() for p in tiny_lm.parameters())
    buffers = sum(b.numel() for b in tiny_lm.model.buffers())
    with LiveTensorBytes() as mode:
        copy = cast_copy(tiny_lm, torch.bfloat16)
    # a float32 deepcopy would peak at 4 bytes/param (then 2 more for the cast); this allocates 2 bytes/param
    assert mode.peak <= 2 * (params + buffers) + 4096, (mode.peak, params)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    for (name, a), (_, b) in zip(tiny_lm.model.named_parameters(), copy.model.named_parameters(), strict=True):
        assert torch.equal(a.detach().to(torch.bfloat16), b), name
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4]])
    with torch.no_grad():
        got = copy.full_logits(ids, torch.tensor([8]), 4).float()
        ref = tiny_lm.full_logits(ids, torch.tensor([8]), 4)
    assert torch.allclose(got, ref, atol=0.1, rtol=0.05)
    assert torch.equal(copy.model.model.rotary_emb.inv_freq.float(),
                       tiny_lm.model.model.rotary_emb.inv_freq.float())  # RoPE kept exact
