"""LoRA end to end on the tiny model (issue 28 item 6): `lrl fit`, checkpoints that hold the adapters only, resume
bit-identical, `scripts/export_policy.py` merging, and `lrl validate` of the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_fit import _run

from lrl.cli import cli_main
from lrl.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LORA = "--model.init_args.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, o_proj, down_proj]}"
KEEP_ALL = "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}"  # a random model is never right
EXTRA = (LORA, "--model.init_args.loss.kl_beta=0.05", "--model.init_args.lr=1e-2")


def _adapters(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


@pytest.fixture(scope="module")
def straight(peaky_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_straight")
    return _run(peaky_checkpoint, out, 3, *EXTRA), out


def test_fit_trains_the_adapters_against_the_base(straight, peaky_checkpoint):
    cli, out = straight
    metrics = cli.trainer.logged_metrics
    assert float(metrics["kl"]) > 0  # the adapters moved the policy away from the reference (the base)
    assert any(v.abs().max() > 0 for k, v in _adapters(cli.model).items() if "lora_B" in k)  # B started at 0
    ckpt = torch.load(out / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no frozen base
    n_adapters = sum(1 for p in cli.model.parameters() if p.requires_grad)
    assert len(keys) == n_adapters == len(ckpt["optimizer_states"][0]["state"])
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    base_bytes = sum(p.numel() * 4 for p in load_checkpoint(peaky_checkpoint)[0].parameters())
    assert adapter_bytes < base_bytes / 20 and ckpt["lrl"]["lora"]["rank"] == 4


def test_resume_is_bit_identical(straight, peaky_checkpoint, tmp_path):
    """Two steps, save, resume, one more step == three steps straight (adapters and logged losses)."""
    cli_full, _ = straight
    out = tmp_path / "resumed"
    _run(peaky_checkpoint, out, 2, *EXTRA)
    cli = _run(peaky_checkpoint, out, 3, *EXTRA, "--ckpt_path", "last")
    assert cli.model.rl_step == 3
    a, b = _adapters(cli_full.model), _adapters(cli.model)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"adapters differ at {k}")
    for key in ("loss/policy", "kl", "tpf/mean", "reward/total/mean"):
        assert float(cli.trainer.logged_metrics[key]) == float(cli_full.trainer.logged_metrics[key]), key


def test_loading_other_adapters_is_refused(straight, peaky_checkpoint):
    """A module with other (or no) adapters refuses the checkpoint in one line; the same adapters load."""
    from lrl.module import LightningRLModule

    _, out = straight
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    for lora in ({"rank": 2, "alpha": 8, "target_modules": targets}, None):
        ckpt = torch.load(out / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
        with pytest.raises(ValueError, match=r"^model.init_args.lora: the checkpoint was trained with lora="):
            LightningRLModule(str(peaky_checkpoint), lora=lora).on_load_checkpoint(ckpt)
    same = LightningRLModule(str(peaky_checkpoint), lora={"rank": 4, "alpha": 8, "target_modules": targets})
    same.on_load_checkpoint(ckpt)
    same.load_state_dict(ckpt["state_dict"])  # strict: the frozen names were filled from the base


def test_export_merges_the_adapters(straight, tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from export_policy import export_policy

    from lrl.module import LightningRLModule

    _, out = straight
    ckpt = out / "ckpts" / "last.ckpt"
    path = export_policy(ckpt, tmp_path / "policy")
    plain, _ = load_checkpoint(path)  # the project's loader: a plain checkpoint, no peft layers
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    module = LightningRLModule.load_from_checkpoint(ckpt, map_location="cpu", loss={"kl_beta": 0.0})
    ids, lengths = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4]]), torch.tensor([8])
    with torch.no_grad():
        want = module.policy.eval().full_logits(ids, lengths, 4)
        got = plain.eval().full_logits(ids, lengths, 4)
        base = load_checkpoint(module.hparams.checkpoint)[0].eval().full_logits(ids, lengths, 4)
    # float32: W·x + B(A·x) and (W + BA)·x round differently, ~1e-6 of the logits' scale (the peaky head: ~30)
    torch.testing.assert_close(got, want, atol=2e-6 * float(want.abs().max()), rtol=0)
    assert (want - base).abs().max() > 1e-3  # the adapters are in the export, not just the base


def _validate(base, logs: Path, *extra) -> dict:
    args = ["validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(base),
            "--block_size", "4", "--data.init_args.task_kwargs={num_train: 10, num_eval: 4}",
            "--data.init_args.eval_size=4", "--data.init_args.max_new_tokens=8",
            "--model.init_args.eval.max_new_tokens=8", "--model.init_args.eval.thresholds=[0.5]",
            f"--trainer.logger.init_args.save_dir={logs}", "--trainer.enable_progress_bar=false", *extra]
    cli_main(args)
    return json.loads(next(logs.rglob("pareto.json")).read_text())


def test_validate_evaluates_the_adapters_like_their_export(straight, peaky_checkpoint, tmp_path, monkeypatch):
    """`lrl validate --ckpt_path <LoRA .ckpt>` scores what the merged export scores."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from export_policy import export_policy

    monkeypatch.chdir(tmp_path)
    _, out = straight
    ckpt = out / "ckpts" / "last.ckpt"
    lora = _validate(peaky_checkpoint, tmp_path / "lora", LORA, f"--ckpt_path={ckpt}")
    merged = _validate(export_policy(ckpt, tmp_path / "policy"), tmp_path / "merged")
    # (a --ckpt_path file's hyperparameters win over the command line's: the run's eval.thresholds=[0.5])
    pick = [(p["setting"], p["accuracy"], p["tpf"]) for p in lora["points"]]
    assert pick == [(p["setting"], p["accuracy"], p["tpf"]) for p in merged["points"]]
    assert [p[0] for p in pick] == ["static_1tok", "dynamic@0.5"]
    base = _validate(peaky_checkpoint, tmp_path / "base", "--model.init_args.eval.thresholds=[0.5]")
    assert base["points"][1]["tpf"] != lora["points"][1]["tpf"]  # the adapters were evaluated, not the base
    assert lora["checkpoint"] == str(ckpt)



def test_engine_copy_and_pareto_saves_get_the_merged_weights(peaky_checkpoint, tmp_path):
    """An engine-owned copy (data.rollout.dtype float64 ≠ the policy's) is synced with W + BA, and a Pareto save
    is a plain checkpoint of the merged weights."""
    from test_fit import _args

    from lrl.models.lora import MergedWeights

    out = tmp_path / "run"
    callbacks = ("--trainer.callbacks=[{class_path: callbacks.ParetoFrontierCheckpoint, init_args: {every_n_steps: 2, "
                 "eval_size: 4}}]")
    cli = cli_main(_args(peaky_checkpoint, out, 2) + [KEEP_ALL, callbacks, *EXTRA,
                                                      "--data.init_args.rollout={dtype: float64}"])
    cli.datamodule.sync_generator()  # the weights of the last step (the pipeline syncs before each rollout)
    engine, policy = cli.datamodule.generator.lm, cli.model.policy
    assert engine is not policy and engine.dtype == torch.float64
    merged = MergedWeights(policy.model)
    plain, _ = load_checkpoint(peaky_checkpoint)
    moved = 0
    for name, t in engine.model.named_parameters():
        torch.testing.assert_close(t, merged[name].double(), rtol=0, atol=0)
        moved += not torch.equal(merged[name], plain.model.state_dict()[name])
    assert moved  # the synced weights are the adapted ones, not the base
    saved, _ = load_checkpoint(sorted(out.rglob("model.safetensors"))[-1].parent)
    for name, t in saved.model.state_dict().items():
        torch.testing.assert_close(t, merged[name], rtol=0, atol=0, msg=name)


def test_rollout_server_gets_the_merged_weights(peaky_checkpoint, tmp_path):
    """Rollouts from an `lrl serve` process (the SGLang client and disk weight sync): after two LoRA steps the
    server decodes what the adapted policy decodes, not what the base does."""
    from serve_utils import _start_server, _stop

    from lrl.models.lora import adapters_disabled
    from lrl.rollout import NativeEngine, SamplingParams

    proc, url = _start_server(peaky_checkpoint, tmp_path / "server.log", "--threshold", "0.9", "--block-size", "4")
    try:
        out = tmp_path / "run"
        cli = cli_main([
            "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--config", str(ROOT / "configs" / "rollout" / "sglang.yaml"), "--checkpoint", str(peaky_checkpoint),
            "--block_size", "4", f"--data.init_args.rollout.urls=[{url}]",
            f"--data.init_args.rollout.sglang={{weight_sync: disk, sync_dir: {tmp_path}/sync, timeout_s: 120, "
            "health_timeout_s: 60, sync_dtype: float32}",
            "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=4",
            "--data.init_args.max_new_tokens=8", "--data.init_args.task_kwargs={num_train: 20, num_eval: 4}",
            "--data.init_args.max_refill_rounds=1", "--model.init_args.minibatches=1", *EXTRA,
            "--model.init_args.warmup_steps=0", "--model.init_args.max_rl_steps=2",
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={out}",
            KEEP_ALL, "--trainer.callbacks=[]",
        ])
        gen, policy = cli.datamodule.generator, cli.model.policy.eval()
        assert type(gen).__name__ == "SGLangRolloutGenerator"
        assert float(cli.trainer.logged_metrics["weight_version"]) == 1.0  # step 2 rolled out with step 1's
        cli.datamodule.sync_generator()  # after training: the trained weights of RL step 2
        assert gen.weight_version == 2
        sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=16, threshold=0.9)
        prompts = ["Q: 2+2?\nA: ", "Q: 17+5?\nA: ", "abc"]
        local = NativeEngine(policy, cli.model.tokenizer).generate(prompts, sp)
        with adapters_disabled(policy):
            base = NativeEngine(policy, cli.model.tokenizer).generate(prompts, sp)
        remote = gen.generate(prompts, sp)
        assert remote.response_ids == local.response_ids
        assert torch.equal(remote.num_forwards, local.num_forwards)
        assert (local.response_ids, local.num_forwards.tolist()) != (base.response_ids, base.num_forwards.tolist())
    finally:
        _stop(proc)


@pytest.mark.slow  # two processes: ~25 s of CPU
def test_ddp_ranks_train_the_same_adapters(peaky_checkpoint, tmp_path):
    """2 DDP ranks (gloo): the adapters' gradients are averaged, so both ranks end with the same adapters, which
    moved, over a base that did not."""
    from fit_utils import run_two_rank_fit

    out = tmp_path / "run"
    run_two_rank_fit(peaky_checkpoint, out, "--trainer.strategy=ddp", LORA, "--model.init_args.max_rl_steps=2",
                     "--trainer.enable_checkpointing=false",
                     KEEP_ALL,
                     f"--trainer.callbacks=[{{class_path: ddp_dump.DumpWeights, init_args: {{out: {out}/weights}}}}]")
    a, b = (torch.load(out / "weights" / f"rank{r}.pt")["weights"] for r in (0, 1))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=f"ranks diverged at {name}")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    plain = load_checkpoint(peaky_checkpoint)[0].model.state_dict()
    for name, tensor in plain.items():
        key = name if name in a else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(a[key], tensor), name
