"""Every shipped YAML instantiates with a tiny model; bad configs fail early with the offending field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
PIECES = {
    d: sorted((ROOT / "configs" / d).glob("*.yaml")) for d in ("model", "data", "trainer", "algorithm", "rollout")
}
# recipes of committed bases, and those of past experiments kept beside their page (docs/experiments/recipes/)
SFT_PIECES = sorted([*(ROOT / "configs" / "sft").glob("*.yaml"),
                     *(ROOT / "docs" / "experiments" / "recipes").glob("*.yaml")])


def _stack(config: Path) -> list[Path]:
    """How a shipped experiment file is used: alone; an overlay's `base:` is read first by the CLI itself."""
    return [config]


def _instantiate(tiny_checkpoint, configs, *extra):
    args = []
    for c in configs:
        args += ["--config", str(c)]
    args += ["--checkpoint", str(tiny_checkpoint), *extra]
    return cli_main(args, run=False)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_instantiates(config, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs/ paths land in tmp
    cli = _instantiate(
        tiny_checkpoint,
        _stack(config),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    )
    assert cli.model.hparams.checkpoint == str(tiny_checkpoint)
    assert cli.datamodule.checkpoint == str(tiny_checkpoint)  # linked: one source


def _resolved(tiny_checkpoint, configs, *extra) -> dict:
    """Every resolved value of a composition, flattened to dotted keys (list items as `key[i]`)."""
    cfg = _instantiate(tiny_checkpoint, configs, *extra).config.as_dict()
    cfg.pop("config", None)  # the paths given, not a value
    cfg.pop("base", None)  # which file an overlay sits on, not a value

    def flat(value, prefix=""):
        if isinstance(value, dict):
            items = ((f"{prefix}.{key}" if prefix else key, item) for key, item in value.items())
            return {k: v for key, item in items for k, v in flat(item, key).items()}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}[{i}]").items()}
        return {prefix: value}

    return flat(cfg)


# What each profile changes in the paper profile, written out by hand from the spec (§9) and the files as they were
# when each was a full copy of lightningrl.yaml; every other resolved value must be the paper profile's.
PROFILE_CHANGES = {
    "grpo_traj.yaml": {
        "model.init_args.loss.nll_weight": 0.0,
        "data.init_args.rewards[1].init_args.normalize": "none",  # TPF
        "data.init_args.rewards[1].init_args.weight": 0.0,
        "data.init_args.advantage": "prompt_group",
        "data.init_args.filter.tpf_range_threshold": None,  # all-wrong groups only
        "trainer.default_root_dir": "outputs/grpo_traj",
        "trainer.logger.init_args.name": "grpo_traj",
    },
    "lightningrl_released.yaml": {
        "model.init_args.estimator": "single_pass",
        "model.init_args.loss.nll_correct": "reward_nonneg",
        "model.init_args.reset_optimizer_each_step": True,
        "data.init_args.rewards[0].init_args.normalize": "z_score",  # Accuracy
        "data.init_args.eos_policy": "keep_final_block",
        "data.init_args.refill": False,
        "data.init_args.max_refill_rounds": 1,
        "trainer.precision": "16-mixed",
        "trainer.default_root_dir": "outputs/lightningrl_released",
        "trainer.logger.init_args.name": "lightningrl_released",
    },
}


@pytest.mark.parametrize("name", sorted(PROFILE_CHANGES))
def test_profile_differs_from_the_paper_profile_exactly_as_written(name, tiny_checkpoint, tmp_path, monkeypatch):
    """`grpo_traj.yaml` and `lightningrl_released.yaml` resolve to the paper profile with exactly the listed
    changes, whether a file is a full copy or an overlay (the overlays keep the shipped behaviour)."""
    monkeypatch.chdir(tmp_path)
    paper = _resolved(tiny_checkpoint, [ROOT / "configs" / "lightningrl.yaml"])
    got = _resolved(tiny_checkpoint, _stack(ROOT / "configs" / name))
    want = {**paper, **PROFILE_CHANGES[name]}
    assert got.keys() == want.keys()
    assert {k: got[k] for k in got if got[k] != want[k]} == {}
    assert all(paper[k] != v for k, v in PROFILE_CHANGES[name].items())  # each listed change is a change


OVERLAYS = [p for p in EXPERIMENTS if "base" in (yaml.safe_load(p.read_text()) or {})]


def test_the_overlays_are_the_sdar_profiles_grpo_traj_released_and_dultra():
    assert sorted(p.name for p in OVERLAYS) == ["dultra.yaml", "grpo_traj.yaml", "lightningrl_released.yaml",
                                                "sdar_1p7b_1gpu.yaml", "sdar_8b_b32.yaml", "sdar_8b_lora_1gpu.yaml"]


@pytest.mark.parametrize("config", OVERLAYS, ids=lambda p: p.name)
def test_an_overlay_alone_equals_its_base_then_it(config, tiny_checkpoint, tmp_path, monkeypatch):
    """`--config overlay.yaml` reads its `base:` first: the same run as `--config <base> --config overlay.yaml`
    (the base is not read twice), and the file's usage line says so."""
    monkeypatch.chdir(tmp_path)
    base = config.parent / yaml.safe_load(config.read_text())["base"]
    cpu = ("--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto")
    alone, both = (_resolved(tiny_checkpoint, c, *cpu) for c in ([config], [base, config]))
    assert alone == both and alone["model.init_args.max_rl_steps"] is not None
    assert f"lrl fit --config configs/{config.name}" in config.read_text()


@pytest.mark.parametrize("piece", [p for ps in PIECES.values() for p in ps], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_piece_composes(piece, tiny_checkpoint, tmp_path, monkeypatch):
    """A piece layered on the tiny quickstart base still instantiates."""
    monkeypatch.chdir(tmp_path)
    base = ROOT / "configs" / "lightningrl.yaml"
    extra = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    ]
    # the synthetic task's pieces come with the model piece of their committed base (48 new tokens fit its block)
    model = {"synthetic.yaml": "tiny.yaml", "synthetic_styles.yaml": "styles_b16.yaml"}.get(piece.name)
    stack = [base, ROOT / "configs" / "model" / model, piece] if model else [base, piece]
    if piece.parent.name == "model" and "data" in yaml.safe_load(piece.read_text()):
        stack = [ROOT / "configs" / "quickstart.yaml", piece]  # a base that carries its synthetic task's styles
    cli = _instantiate(tiny_checkpoint, stack, *extra)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
@pytest.mark.parametrize("piece", PIECES["data"], ids=lambda p: f"data/{p.name}")
def test_every_experiment_composes_with_every_data_piece(experiment, piece, tiny_checkpoint, tmp_path, monkeypatch):
    """`lrl fit --config <experiment> --config configs/data/<piece>` builds, with the piece's task arguments (a
    synthetic experiment's num_train / eval_seed used to reach GSM8K and fail in setup)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    cli = _instantiate(tiny_checkpoint, [*_stack(experiment), piece], "--trainer.accelerator=cpu",
                       "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true")
    want = yaml.safe_load(piece.read_text())["data"]["init_args"]
    got = cli.datamodule.hparams
    assert (got["task"], got["task_kwargs"], got["eval_seed"]) == (want["task"], want["task_kwargs"], want["eval_seed"])


@pytest.mark.parametrize("piece", SFT_PIECES, ids=lambda p: f"sft/{p.name}")
def test_sft_piece_composes(piece, tiny_checkpoint, tmp_path, monkeypatch):
    """An SFT overlay on configs/sft_tiny.yaml instantiates, and its merged view (what scripts read) agrees."""
    from lrl.config_files import merged_config

    monkeypatch.chdir(tmp_path)
    stack = [ROOT / "configs" / "sft_tiny.yaml", piece]
    cli = _instantiate(tiny_checkpoint, stack, "--model.init_args.export_dir", str(tmp_path / "export"))
    merged = merged_config([str(p) for p in stack])
    assert cli.model.block_size == merged["block_size"]
    assert cli.model.hparams.lr == merged["model"]["init_args"]["lr"]
    assert cli.model.export_dir == str(tmp_path / "export")


def test_merged_config_overrides_in_order(tmp_path):
    from lrl.config_files import merged_config

    (tmp_path / "a.yaml").write_text("block_size: 8\nmodel:\n  init_args: {lr: 1.0, betas: [1, 2], keep: x}\n")
    (tmp_path / "b.yaml").write_text("block_size: 16\nmodel:\n  init_args: {lr: 2.0, betas: [3]}\n")
    merged = merged_config([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    assert merged == {"block_size": 16, "model": {"init_args": {"lr": 2.0, "betas": [3], "keep": "x"}}}
    # an argument whose value is a dictionary is replaced whole, as LightningCLI does; class configs still merge
    (tmp_path / "d.yaml").write_text("data:\n  init_args: {task_kwargs: {num_train: 5, styles: {a: 1}}, seed: 1}\n"
                                     "trainer:\n  logger: {class_path: L, init_args: {name: x, version: v}}\n")
    (tmp_path / "e.yaml").write_text("data:\n  init_args: {task_kwargs: {styles: {b: 1}}}\n"
                                     "trainer:\n  logger: {init_args: {version: w}}\n")
    merged = merged_config([str(tmp_path / "d.yaml"), str(tmp_path / "e.yaml")])
    assert merged["data"] == {"init_args": {"task_kwargs": {"styles": {"b": 1}}, "seed": 1}}
    assert merged["trainer"] == {"logger": {"class_path": "L", "init_args": {"name": "x", "version": "w"}}}
    # a typed group (a dataclass argument, e.g. the loss knobs) merges key by key, as jsonargparse merges it
    (tmp_path / "f.yaml").write_text("model:\n  class_path: lrl.module.LightningRLModule\n"
                                     "  init_args: {loss: {kl_beta: 0.0, nll_weight: 0.5}, planner_head: {a: 1}}\n")
    (tmp_path / "g.yaml").write_text("model:\n  init_args: {loss: {nll_weight: 0.0}, planner_head: {b: 2}}\n")
    merged = merged_config([str(tmp_path / "f.yaml"), str(tmp_path / "g.yaml")])["model"]["init_args"]
    assert merged == {"loss": {"kl_beta": 0.0, "nll_weight": 0.0}, "planner_head": {"b": 2}}
    (tmp_path / "c.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="c.yaml: a config must be a YAML mapping"):
        merged_config([str(tmp_path / "c.yaml")])


def test_merged_config_reads_the_task_the_cli_builds(tiny_checkpoint, tmp_path, monkeypatch):
    """Scripts (bench_method, build_base) read task arguments with `merged_config`; a model piece that sets the
    task's styles must give them the task the CLI trains on (a deep merge once added the quickstart's `padded` to
    the `sums` piece's styles, so the benchmark evaluated other held-out problems than it trained for)."""
    from lrl.config_files import merged_config

    monkeypatch.chdir(tmp_path)
    for piece in ("styles_pairs_b16.yaml", "styles_ans_b16.yaml"):
        stack = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "model" / piece]
        cli = _instantiate(tiny_checkpoint, stack)
        merged = merged_config([str(p) for p in stack])["data"]["init_args"]["task_kwargs"]
        assert merged == cli.datamodule.hparams.task_kwargs, piece


def _expect_error(tiny_checkpoint, capsys, *args, match: str):
    with pytest.raises((SystemExit, ValueError)) as info:
        cli_main(
            [
                "--config",
                str(ROOT / "configs" / "lightningrl.yaml"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--trainer.accelerator=cpu",
                *args,
            ],
            run=False,
        )
    err = capsys.readouterr().err + str(info.value)
    assert match in err, err


def test_unknown_key_fails_naming_it(tiny_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_error(tiny_checkpoint, capsys, "--model.init_args.learning_rate=1", match="learning_rate")


def test_group_size_one_fails_naming_it(tiny_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_error(tiny_checkpoint, capsys, "--data.init_args.group_size=1", match="data.group_size must be >= 2")


def test_block_size_not_dividing_max_tokens_fails(tiny_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_error(
        tiny_checkpoint, capsys, "--block_size=7", match="data.max_new_tokens=1024 must be a multiple of block_size=7"
    )


def test_mask_id_mismatch_fails(tiny_checkpoint, tmp_path, monkeypatch):
    """A mask id that disagrees with the checkpoint/tokenizer fails before any compute."""
    monkeypatch.chdir(tmp_path)
    cli = _instantiate(
        tiny_checkpoint,
        [ROOT / "configs" / "lightningrl.yaml"],
        "--mask_token_id=5",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    )
    with pytest.raises(ValueError, match="mask"):
        cli.model.configure_model()


def test_quickstart_on_the_block16_base(tmp_path, monkeypatch):
    """The README's block-16 command builds the module and data on the committed base with one block size."""
    monkeypatch.chdir(ROOT)
    cli = cli_main(["--config", "configs/quickstart.yaml", "--config", "configs/model/tiny_b16.yaml",
                    f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"],
                   run=False)
    assert cli.model.hparams.checkpoint == "outputs/base/sft_tiny_b16"
    assert cli.datamodule.block_size == 16 and cli.model.hparams.block_size == 16
    cli.model.configure_model()
    assert cli.model.policy.bd.block_size == 16


def _shipped_model_pieces():
    import yaml

    return [p for p in PIECES["model"] if yaml.safe_load(p.read_text())["checkpoint"].startswith("outputs/base/")]


@pytest.mark.parametrize("piece", _shipped_model_pieces(), ids=lambda p: p.name)
def test_model_piece_points_at_a_matching_committed_base(piece):
    """Model pieces for the demo task name a committed base whose block size is the piece's."""
    import json

    import yaml

    cfg = yaml.safe_load(piece.read_text())
    saved = json.loads((ROOT / cfg["checkpoint"] / "config.json").read_text())
    assert saved["block_size"] == cfg["block_size"], piece
