"""Text reports of the language-model reproductions: the command's one-line ``headline`` per task and the README's
``markdown`` tables (arms, critical batch sizes, the LR sweep)."""

from __future__ import annotations

import math

from .common import mean_std

__all__ = ["headline", "markdown"]


def headline(name: str, result: dict) -> str:
    """One line per task for the command's output."""
    lines = []
    for task, m in result["tasks"].items():
        rt = m["range_test"]
        lr_part = (
            f"range test suggests {rt['suggestion']:.3g} vs sweep best {m['best_lr']:.3g}"
            if rt["suggestion"]
            else f"range test gave no suggestion; sweep best {m['best_lr']:.3g}"
        )
        cbs = ", ".join(
            f"{r['tokens'] / 1e6:.2f}M tok: B_crit {r['b_crit']} / B_simple {_num(r['noise_scale'])}"
            for r in m["critical_batch"]
        )
        if name == "critical-batch":
            lines.append(f"{task}: {cbs}; {lr_part}")
            continue
        cells = "; ".join(
            f"{arm} {c['eval_loss']:.4f}+-{c['eval_loss_std']:.4f} in {c['optimizer_steps']} steps"
            for arm, c in m["arms"].items()
        )
        s = m["summary"]["seesaw"]
        lines.append(
            f"{task}: {cells}; seesaw vs constant {100 * s['eval_loss_rel_diff_vs_constant']:+.2f}% eval loss, "
            f"{100 * s['step_reduction_vs_constant']:.0f}% fewer steps (target met: {m['summary']['target_met']}); "
            f"{lr_part}"
        )
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def markdown(result: dict) -> str:
    """The README tables: arms (eval loss mean +- std, optimizer steps, tokens) and the critical batch sizes."""
    lines = []
    for task, m in result["tasks"].items():
        if "arms" in m:
            lines += [
                f"**{task}** (best swept LR {m['best_lr']:g})",
                "",
                "| arm | eval loss (mean +- std) | vs constant (paired) | optimizer steps | tokens | batch sizes |",
                "|---|---|---|---|---|---|",
            ]
            for arm, c in m["arms"].items():
                rel = m["summary"].get(arm, {}).get("eval_loss_rel_diff_vs_constant")
                paired = [x / c0 - 1 for x, c0 in zip(c["eval_losses"], m["arms"]["constant"]["eval_losses"])]
                p_mean, p_std = mean_std(paired)
                rel_text = (
                    "" if rel is None else f"{100 * rel:+.2f}% (paired {100 * p_mean:+.2f} +- {100 * p_std:.2f}%)"
                )
                lines.append(
                    f"| {arm} | {c['eval_loss']:.4f} +- {c['eval_loss_std']:.4f} | {rel_text} | "
                    f"{c['optimizer_steps']} | {c['tokens']:,} | {', '.join(map(str, c['batch_sizes']))} |"
                )
            lines.append("")
        lines += [
            f"| {task}: tokens trained | B_crit | B_simple | loss at checkpoint | branch losses |",
            "|---|---|---|---|---|",
        ]
        for r in m["critical_batch"]:
            losses = ", ".join(f"{b}: {x:.4f}" for b, x in zip(r["batch_sizes"], r["losses"]))
            lines.append(
                f"| {r['tokens']:,} | {r['b_crit']} | {_num(r['noise_scale'])} | {r['loss_start']:.4f} | {losses} |"
            )
        sweep = ", ".join(f"{float(lr):g}: {run['eval_loss']:.4f}" for lr, run in m["sweep"].items())
        rt = m["range_test"]
        lines += [
            "",
            f"LR sweep (constant batch, seed {result['config']['seeds'][0]}): {sweep}; range test "
            f"suggestion {_num(rt['suggestion'])}.",
            "",
        ]
    return "\n".join(lines)
