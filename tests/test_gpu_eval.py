"""CUDA check of the Pareto evaluation (marked ``gpu``, deselected by default; issue 28 item 5): under
``bf16-mixed`` the sweep's matmuls run in bf16 (autocast) over the float32 policy, and it decodes the same
responses count as on CPU. Run with ``pytest -o addopts="" -m gpu tests/test_gpu_eval.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def test_eval_runs_under_bf16_autocast_on_the_fp32_policy(peaky_checkpoint):
    from lrl.module import LightningRLModule
    from lrl.tasks import get_task

    module = LightningRLModule(str(peaky_checkpoint), block_size=4, loss={"kl_beta": 0.0},
                               eval={"max_new_tokens": 8, "thresholds": [0.5]})
    module.configure_model()
    module.policy.to("cuda")
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, datamodule=None, precision="bf16-mixed")
    dtypes = set()
    proj = module.policy.model.model.layers[0].mlp.down_proj
    hook = proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    task = get_task("synthetic", num_train=10, num_eval=4)
    result = module.run_pareto(task, task.load("test"))
    hook.remove()
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.policy.parameters())
    assert [p.num_responses for p in result.points] == [4, 4]
