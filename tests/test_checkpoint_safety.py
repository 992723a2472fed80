"""Crash-safe checkpoints (`callbacks.RLCheckpoint`), preemption and resume, with real `lrl fit` processes on the
committed tiny base: SIGTERM / SIGUSR1 save and exit 128 + signal, SIGKILL in the middle of a checkpoint write
leaves a resumable run, cadence in RL steps (filtered steps count), a final checkpoint, finished-run resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "outputs" / "base" / "sft_tiny"
KEEP_ALL = "{all_wrong: false, tpf_range_threshold: null}"  # data.init_args.filter: every group kept
DROP_ALL = "{all_wrong: false, tpf_range_threshold: 100.0}"


def _args(out: Path, steps: int, *extra: str, hooks: tuple[str, ...] = (), filt: str = KEEP_ALL, every: int = 1):
    callbacks = [*hooks,
                 f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, save_last: true, "
                 f"every_n_rl_steps: {every}, keep_last: -1}}}}"]
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(BASE), "--block_size=8",
        "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=2",
        "--data.init_args.max_new_tokens=8", "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}",
        "--data.init_args.eval_size=4", "--data.init_args.max_refill_rounds=1",
        "--model.init_args.minibatches=1", "--model.init_args.micro_batch_size=4",
        "--model.init_args.lr=1e-3", "--model.init_args.warmup_steps=0",
        "--model.init_args.eval.max_new_tokens=8", "--model.init_args.eval.thresholds=[0.5]",
        f"--model.init_args.max_rl_steps={steps}", f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
        f"--data.init_args.filter={filt}", f"--trainer.callbacks=[{', '.join(callbacks)}]", *extra,
    ]


def _spawn(out: Path, steps: int, *, hooks: tuple[str, ...]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "lrl.cli", *_args(out, steps, hooks=hooks)], cwd=str(out),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 300.0) -> None:
    end = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-4000:])
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _slow_start(marker_dir: Path, at_step: int) -> str:
    return f"{{class_path: crash_hooks.SlowStepStart, init_args: {{marker_dir: {marker_dir}, at_step: {at_step}}}}}"


def _rl_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["lrl"]["rl_step"]


def _weights(cli):
    return {k: v.detach().clone() for k, v in cli.model.policy.model.state_dict().items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Three uninterrupted RL steps: the reference every interrupted-and-resumed run must match bit for bit."""
    cli = cli_main(_args(tmp_path_factory.mktemp("straight"), 3))
    return _weights(cli), cli.datamodule.state_dict()


def _assert_resume_matches(out, straight) -> None:
    """`--ckpt_path last` finishes the 3-step run with the weights and data state of 3 uninterrupted steps."""
    cli = cli_main(_args(out, 3, "--ckpt_path", "last"))
    assert cli.model.rl_step == 3
    weights, data_state = straight
    for k, v in weights.items():
        torch.testing.assert_close(_weights(cli)[k], v, rtol=0, atol=0, msg=f"weights differ at {k}")
    assert cli.datamodule.state_dict() == data_state


def test_sigterm_saves_exits_143_and_resume_is_exact(straight, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(out, 3, hooks=(_slow_start(tmp_path, 1),))
    _wait_for(tmp_path / "step_start_1", proc)  # inside RL step 2, before its rollout
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-4000:]  # 128 + SIGTERM: the scheduler sees a failure, not success
    assert "stopped by SIGTERM after RL step 2" in err and "--ckpt_path last" in err, err[-2000:]
    assert _rl_step(out / "ckpts" / "last.ckpt") == 2  # the step in flight finished and was saved
    _assert_resume_matches(out, straight)


def test_sigusr1_is_a_preemption_too(tmp_path, capsys):
    from callbacks.checkpoint import PREEMPTION
    from lrl.cli import _preempted_exit

    out = tmp_path / "run"
    hook = f"{{class_path: crash_hooks.SignalSelf, init_args: {{signum: {int(signal.SIGUSR1)}, at_step: 0}}}}"
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException, raised once RL step 1 is complete
        cli_main(_args(out, 3, hooks=(hook,)))
    assert PREEMPTION["signal"] == signal.SIGUSR1 and PREEMPTION["rl_step"] == 1
    assert _rl_step(out / "ckpts" / "last.ckpt") == 1
    assert _preempted_exit() == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 after RL step 1" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # our handler is gone after the run


def test_sigkill_during_a_checkpoint_write_leaves_a_resumable_run(straight, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    marker = tmp_path / "writing"
    # saves per step: rl_step=K.ckpt, then last.ckpt; the 4th write is step 2's last.ckpt
    hook = f"{{class_path: crash_hooks.PauseInCheckpointWrite, init_args: {{marker: {marker}, nth: 4}}}}"
    proc = _spawn(out, 3, hooks=(hook,))
    _wait_for(marker, proc)
    proc.kill()
    proc.communicate(timeout=60)
    ckpts = out / "ckpts"
    partial = Path(marker.read_text())
    assert partial.parent == ckpts and partial.name.startswith(".last.ckpt.")  # the temp file is beside it
    assert _rl_step(ckpts / "last.ckpt") == 1  # the previous last.ckpt is intact
    assert _rl_step(ckpts / "rl_step=2.ckpt") == 2
    # step 2's metrics reached the disk before its checkpoint did
    events = EventAccumulator(str(out / "quickstart" / "main"))
    events.Reload()
    assert [e.value for e in events.Scalars("rl_step")] == [1.0, 2.0]
    # the damage the old writer did (a truncated last.ckpt, newest on disk) is passed over with a warning
    (ckpts / "last.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"last\.ckpt does not load.*resuming from .*rl_step=2\.ckpt"):
        _assert_resume_matches(out, straight)


def test_filtered_steps_count_final_checkpoint_and_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    cli = cli_main(_args(out, 3, filt=DROP_ALL, every=2))  # every group dropped: no optimizer step at all
    assert cli.trainer.global_step == 0 and cli.model.rl_step == 3
    ckpts = out / "ckpts"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "rl_step=2.ckpt", "rl_step=3.ckpt"]
    assert _rl_step(ckpts / "rl_step=2.ckpt") == 2 and _rl_step(ckpts / "last.ckpt") == 3  # 3 = the final save
    before = (ckpts / "last.ckpt").read_bytes()
    cli = cli_main(_args(out, 3, "--ckpt_path", "last", filt=DROP_ALL, every=2))
    assert cli.model.rl_step == 3
    saved = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["RolloutDataModule"]
    assert cli.datamodule.state_dict() == saved  # no rollout was drawn: cursor and filter totals as saved
    assert (ckpts / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "rl_step=2.ckpt", "rl_step=3.ckpt"]


def test_atomic_save_and_resolve_last(tmp_path, monkeypatch):
    from callbacks.checkpoint import resolve_last
    from lrl.atomic import atomic_torch_save

    other = tmp_path / "other_fs_tmp"
    other.mkdir()
    monkeypatch.setenv("TMPDIR", str(other))  # Lightning's writer put its temp file here
    d = tmp_path / "ckpts"
    atomic_torch_save({"state_dict": {}, "n": 1}, d / "last.ckpt")

    def boom(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"state_dict": {}, "n": 2}, d / "last.ckpt")
    monkeypatch.undo()
    assert torch.load(d / "last.ckpt", weights_only=False)["n"] == 1  # the old file is untouched
    assert sorted(p.name for p in d.iterdir()) == ["last.ckpt"] and not list(other.iterdir())
    atomic_torch_save({"state_dict": {}, "n": 3}, d / "rl_step=3.ckpt")
    (d / "rl_step=4.ckpt").write_bytes(b"PK\x03\x04 truncated")
    for age, name in enumerate(["rl_step=4.ckpt", "rl_step=3.ckpt", "last.ckpt"]):  # newest first
        os.utime(d / name, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    path, broken = resolve_last([d])
    assert path == d / "rl_step=3.ckpt" and broken == [d / "rl_step=4.ckpt"]
    (d / "rl_step=3.ckpt").write_bytes(b"")
    os.utime(d / "rl_step=3.ckpt", ns=(2 * 10**18, 2 * 10**18))
    assert resolve_last([d]) == (d / "last.ckpt", [d / "rl_step=3.ckpt", d / "rl_step=4.ckpt"])
