"""The overhead table: the costs the ``benchmarks/bench_*.py`` scripts measured, gathered from their JSON files.

``gather_overheads`` reads ``OVERHEAD_SOURCES`` (file, key path, unit, command per figure) from the results folder
of a checkout and writes ``overheads.json`` and ``overheads.md``; ``hf-batchsched reproduce overheads`` runs it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from .common import write_result

__all__ = ["DEFAULT_RESULTS_DIR", "OVERHEAD_SOURCES", "gather_overheads", "lookup"]

# the benchmark scripts' output folder, relative to the checkout the command runs in
DEFAULT_RESULTS_DIR = pathlib.Path("benchmarks", "results")


def _run_script(script: pathlib.Path, extra: Sequence[str] = (), timeout: float = 1800) -> None:
    """Run one benchmark script of the checkout (one OpenMP thread unless set) from the checkout's root."""
    if not script.is_file():
        raise FileNotFoundError(f"{script} does not exist; rerunning needs the repository's benchmark scripts")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run(
        [sys.executable, str(script), *extra], check=True, cwd=script.parent.parent, env=env, timeout=timeout
    )


# name -> (results file, [(label, key path, unit)], command). Each benchmark script documents its set-up.
OVERHEAD_SOURCES: dict[str, tuple[str, list[tuple[str, str, str]], str]] = {
    "trainer": (
        "trainer.json",
        [
            (
                "BatchRampTrainer / Trainer throughput, constant batch 16 (CPU-time based, median of pairs)",
                "cpu_throughput_ratio_ramp_over_plain",
                "x",
            ),
            ("same, wall-clock based (shared CPU: noisy)", "throughput_ratio_ramp_over_plain", "x"),
            ("peak memory, ramp 8->256 (micro-batch 8) / constant 8", "memory_ratio_ramp8to256_over_const8", "x"),
            (
                "peak memory, constant 256 in one chunk / constant 8 (what the ramp avoids)",
                "memory_ratio_const256_one_chunk_over_const8",
                "x",
            ),
        ],
        "python benchmarks/bench_trainer.py",
    ),
    "sharpness": (
        "sharpness.json",
        [
            (
                "SharpnessProbeCallback overhead at its default cadence (probe time / train time)",
                "callback_overhead.overhead_pct_measured_probe_time",
                "%",
            ),
            ("same, wall-clock difference", "callback_overhead.overhead_pct_wall_difference", "%"),
            (
                "Lanczos / power-iteration HVPs to 1% of lambda_max",
                "lanczos_vs_power.total_ratio_lanczos_over_power",
                "x",
            ),
        ],
        "python benchmarks/bench_sharpness.py",
    ),
    "probe_costs": (
        "probe_costs.json",
        [
            (
                "exact HVP / PyHessian-style HVP (first-order graph kept), full tiny Llama",
                "summary.hvp_ours_over_pyhessian_style_full",
                "x",
            ),
            ("same, LoRA adapters", "summary.hvp_ours_over_pyhessian_style_lora", "x"),
            (
                "Keskar call after the first (subspace kept) / before the change, forward+backward equivalents",
                "summary.keskar_cost_later_calls_over_before",
                "x",
            ),
            (
                "Keskar first call, peak memory / before the change",
                "summary.keskar_peak_memory_first_call_over_before",
                "x",
            ),
        ],
        "python benchmarks/bench_probe_costs.py",
    ),
    "noise_scale": (
        "noise_scale.json",
        [
            (
                "NoiseScaleCallback hook time / step time (tiny Llama, 4 micro-batches)",
                "overhead.hook_time_pct_of_step",
                "%",
            ),
            ("same, side-by-side wall-clock difference (noise)", "overhead.side_by_side_overhead_pct", "%"),
        ],
        "python benchmarks/bench_noise_scale.py",
    ),
    "stability": (
        "stability.json",
        [
            (
                "StabilityMonitor time / train time, tiny Llama, every 25 steps",
                "llama.overhead_percent_accounted",
                "%",
            ),
            ("same, wall-clock difference", "llama.overhead_percent_wallclock", "%"),
            ("StabilityMonitor time / train time, small ResNet (BN)", "resnet.overhead_percent_accounted", "%"),
        ],
        "python benchmarks/bench_stability.py",
    ),
    "demo_task": (
        "demo_task.json",
        [
            (
                "SharpnessProbeCallback at its defaults on the demo's fine-tune (probe time / train time)",
                "sharpness.defaults.probe_pct_of_train_median",
                "%",
            ),
            (
                "same with budget=None (a probe after each of the 9 evaluations)",
                "sharpness.no_budget.probe_pct_of_train_median",
                "%",
            ),
            (
                "adaptive batch (8 -> 64, sqrt LR) / fixed 8: updates to the baseline's eval loss (median, 3 seeds)",
                "adaptive.summary.updates_ratio_median",
                "x",
            ),
        ],
        "python benchmarks/bench_demo_task.py",
    ),
}


def lookup(data, path: str):
    """The value at the dotted ``path`` of nested dicts, ``None`` when a key is missing.

    >>> lookup({"a": {"b": 2}}, "a.b"), lookup({"a": {}}, "a.b")
    (2, None)
    """
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def gather_overheads(
    output_dir: str | os.PathLike, rerun: bool = False, results_dir: str | os.PathLike | None = None
) -> dict:
    """One table of the overheads the benchmark scripts measured (``<results_dir>/*.json``).

    ``results_dir`` defaults to ``benchmarks/results`` of the checkout the command runs in (the scripts' own output
    folder). With ``rerun=True`` each ``bench_<name>.py`` beside that folder runs first (the scripts are part of
    the repository, not of the installed package). A missing file or key is reported as ``null`` with a note,
    never invented. Writes ``overheads.json`` and ``overheads.md``.
    """
    results_dir = pathlib.Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    rows, notes = [], []
    for name, (filename, metrics, command) in OVERHEAD_SOURCES.items():
        if rerun:
            try:
                _run_script(results_dir.parent / pathlib.Path(command.split()[1]).name)
            except (FileNotFoundError, subprocess.SubprocessError) as error:
                notes.append(f"{name}: rerun failed: {str(error).splitlines()[0]}")
        path = results_dir / filename
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is None:
            notes.append(f"{name}: {filename} not found; run `{command}`")
        for label, key, unit in metrics:
            value = None if data is None else lookup(data, key)
            if data is not None and value is None:
                notes.append(f"{name}: key {key!r} not in {filename}")
            rows.append(
                {
                    "benchmark": name,
                    "figure": label,
                    "value": value,
                    "unit": unit,
                    "source": f"{filename}:{key}",
                    "command": command,
                }
            )
    table = ["| benchmark | figure | value | source | rerun |", "|---|---|---|---|---|"]
    for row in rows:
        value = "n/a" if row["value"] is None else f"{_fmt(row['value'])}{row['unit']}"
        table.append(f"| {row['benchmark']} | {row['figure']} | {value} | `{row['source']}` | `{row['command']}` |")
    markdown = "\n".join(table) + "\n" + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    result = {"experiment": "overheads", "rows": rows, "notes": notes, "markdown": markdown}
    write_result(output_dir, "overheads", result)
    (pathlib.Path(output_dir) / "overheads.md").write_text(markdown)
    return result


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
