"""The frozen reference costs no float32 copy: compute dtype under bf16 precision, unchanged under 32-bit (issue 28)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lrl.algorithms.losses import LossConfig
from lrl.module import LightningRLModule


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_reference_is_held_in_the_compute_dtype(tiny_checkpoint, precision, dtype):
    module = LightningRLModule(str(tiny_checkpoint), loss=LossConfig(kl_beta=0.01))
    module._trainer = SimpleNamespace(precision=precision, strategy=None)
    module.configure_model()
    ref = module._ref[0]
    assert {p.dtype for p in ref.parameters()} == {dtype}
    assert not any(p.requires_grad for p in ref.parameters())
    for (name, a), (_, b) in zip(module.policy.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a.detach().to(dtype), b), name
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}  # the policy itself is untouched


def test_no_reference_without_kl(tiny_checkpoint):
    module = LightningRLModule(str(tiny_checkpoint), loss=LossConfig(kl_beta=0.0))
    module._trainer = SimpleNamespace(precision="bf16-mixed", strategy=None)
    module.configure_model()
    assert module.reference is None
