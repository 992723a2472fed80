"""``lrl plan`` (print a config's memory plan) and the preflight that ``lrl fit`` runs before loading anything.

    lrl plan --config configs/sdar_8b_b32.yaml [--config more.yaml] [--world_size 8] [--device_gb 80]
             [--model_config path/config.json] [--headroom 0.08] [--data.init_args.rollout.kv_cache_gb=20 ...]

Dotted ``--key=value`` arguments override the merged YAML (values parsed as YAML), as on the ``lrl fit`` line.
Exit status: 0 when the plan fits, 1 when it does not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from lrl.plan.plan import build_plan
from lrl.plan.report import format_plan


def _set(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    from lrl.config_files import merged_config

    parser = argparse.ArgumentParser(prog="lrl plan", description="Per-rank memory plan of an `lrl fit` config "
                                     "(components by phase, peak, verdict, checkpoint bytes).")
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for `lrl fit`")
    parser.add_argument("--world_size", type=int, default=None, help="ranks (default: trainer.devices × num_nodes)")
    parser.add_argument("--device_gb", type=float, default=80.0, help="memory of one GPU in GB (10⁹ bytes)")
    parser.add_argument("--headroom", type=float, default=0.08, help="fraction of the device kept free")
    parser.add_argument("--model_config", default=None, help="config.json to take the model's shape from")
    parser.add_argument("--checkpoint", default=None, help="override of the config's checkpoint")
    args, rest = parser.parse_known_args(argv)
    cfg = merged_config(args.config)
    if args.checkpoint:
        cfg["checkpoint"] = args.checkpoint
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides are --dotted.key=value)")
        key, value = item[2:].split("=", 1)
        _set(cfg, key, yaml.safe_load(value))
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        plan = build_plan(cfg, world_size=args.world_size, device_gb=args.device_gb, headroom=args.headroom,
                          model_config=args.model_config)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"lrl plan: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0 if plan.fits else 1


def preflight(config: dict) -> None:
    """``lrl fit`` on a GPU: refuse, before anything is loaded, a config whose plan does not fit the device.

    Raises:
        PlanRefused: one line naming the knob to turn (the CLI prints it and exits with status 2).
    """
    import torch

    trainer = config.get("trainer") or {}
    if str(trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return
    if "LightningRLModule" not in str((config.get("model") or {}).get("class_path", "")):
        return
    devices = trainer.get("devices", "auto")
    per_node = int(devices) if str(devices).isdigit() else torch.cuda.device_count()
    world = per_node * int(trainer.get("num_nodes", 1) or 1)
    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    plan = build_plan(config, world_size=world, device_gb=device_gb)
    if not plan.fits:
        raise PlanRefused(plan.refusal())


class PlanRefused(ValueError):
    """The memory plan says the run cannot fit (a user error: one line, exit status 2)."""
