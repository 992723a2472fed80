"""The plan as text: one table of components by phase, the phase totals, the verdict and the disk figures."""

from __future__ import annotations

from lrl.plan.plan import GB, PHASES, MemoryPlan


def format_plan(plan: MemoryPlan) -> str:
    s, sh = plan.settings, plan.shape
    lines = [
        f"memory plan per rank: {sh.name} ({sh.params / 1e9:.2f} B params, {sh.layers} layers, hidden {sh.hidden}), "
        f"{plan.world_size} rank(s), {s['strategy']}, precision {s['precision']}, estimator {s['estimator']}, "
        f"block {s['block']}" + (", LoRA" if s["lora"] else ""),
        "",
        f"| {'component':<40} | {'phase':<14} | {'GB':>8} | notes |",
        f"|{'-' * 42}|{'-' * 16}|{'-' * 10}|-------|",
    ]
    for r in plan.rows:
        lines.append(f"| {r.component:<40} | {r.phase:<14} | {r.bytes / GB:>8.2f} | {r.note} |")
    lines.append("")
    states = plan.phase_bytes("states")
    for phase in PHASES[1:]:
        total = states + plan.phase_bytes(phase)
        mark = "  <- peak" if phase == plan.peak_phase else ""
        lines.append(f"{phase:>15}: {total / GB:8.2f} GB (states {states / GB:.2f} + "
                     f"{plan.phase_bytes(phase) / GB:.2f}){mark}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{'verdict':>15}: {verdict}: peak {plan.peak_bytes / GB:.2f} GB of {plan.usable_bytes / GB:.1f} GB "
                 f"usable ({plan.device_bytes / GB:.0f} GB device, headroom kept for the CUDA context and "
                 "fragmentation)")
    if not plan.fits:
        lines.append(plan.refusal())
    if plan.disk:
        lines.append("")
        lines.extend(f"{'disk':>15}: {r.component}: {r.bytes / GB:.1f} GB ({r.note})" for r in plan.disk)
    return "\n".join(lines)
