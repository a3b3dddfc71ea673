"""The offline demo: a LoRA fine-tune of a small pretrained Llama on text that ships with Python, with no network.

``hf-batchsched demo`` runs two stages, a domain adaptation from English prose to code:

1. **Base model** (``demo_base_model``): a fresh ``LlamaForCausalLM`` (``demo_model``: hidden 128, 2 layers,
   4 heads, 0.46 M parameters) trained in full on Python's language reference (``base_corpus``: the
   ``pydoc_data/topics.py`` texts that ``help()`` shows, 0.46 MB of English) for ``BASE_TRAINING`` (600 steps of
   16 x 64 tokens, about 25 s on one CPU thread), then saved with ``save_pretrained`` under the cache directory
   (``$HF_BATCHSCHED_CACHE`` or ``~/.cache/hf_batchsched``), keyed by a hash of its settings, text, tokenizer and
   torch/transformers versions: later runs load it in a second or two.
2. **Fine-tune**: the bundled recipe (``hf_batchsched.recipe``) with ``DEMO_CONFIG`` (the same settings as
   ``recipes/configs/demo_cpu.yaml``) and ``model_name_or_path`` pointing at the base: LoRA r=16 on every linear
   layer and the output head (80 K trainable of 539 K parameters; the base weights, embeddings included, stay
   frozen) on Python source code, that of about a hundred pure-Python standard-library modules
   (``stdlib_corpus``: read from their files, nothing imported; cut into functions, methods and other top-level
   statements by ``code_chunks``). Whole modules are held out (every 8th), so the eval loss measures how well the
   model writes code from modules it has not seen; the training split is a fixed sample of ``DEMO_TRAIN_CHARS``
   characters (``demo_corpus``), about 5,600 sequences of 64 tokens. Training has a batch-size ramp (8 -> 32
   samples per step, micro-batch 8), an LR policy on the samples clock, the sharpness probe, TensorBoard event
   files, PNG plots and a one-screen summary with the base model's eval loss, the fine-tuned one and the drop.

Both stages share one byte-level BPE (``demo_tokenizer``, 512 tokens) trained on the base text plus the
fine-tuning split, so code tokenizes as well as prose; it is cached too.

The texts, tokenizer, models and base model are offline assets (``hf_batchsched.assets``); this module holds the
demo's recipe settings, its run and its report.

Example:

>>> DEMO_CONFIG["peft"], DEMO_CONFIG["batch_schedule"]["name"]
('lora', 'geometric')
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .assets import DEMO_CONFIG, demo_base_model
from .recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config, seed

__all__ = [
    "DEMO_CONFIG",
    "DemoResult",
    "format_summary",
    "plot_history",
    "run_demo",
]


@dataclass
class DemoResult:
    """What the demo did: the numbers of its summary and where its files are.

    ``eval_loss_start`` is the base model's eval loss on the held-out modules' code before fine-tuning,
    ``eval_loss_end`` the fine-tuned model's; ``wall_time_s`` covers stage 2 (fine-tune), ``base_time_s`` stage 1
    (training the base model, or loading it from the cache).
    """

    eval_loss_start: float
    eval_loss_end: float
    optimizer_steps: int
    samples_seen: int
    batch_sizes: list[int]
    wall_time_s: float
    output_dir: str
    tensorboard_dir: str | None = None
    plots: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    base_model_dir: str | None = None
    base_trained: bool = False
    base_steps: int = 0
    base_time_s: float = 0.0

    @property
    def eval_loss_drop(self) -> float:
        """Relative drop of the eval loss, ``1 - end / start``."""
        return 1.0 - self.eval_loss_end / self.eval_loss_start


def _series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(samples seen, value)`` pairs of ``key``; entries without a sample count (eval, probes) take that of the
    latest training log at or before their step (steps if the run logged no sample counts)."""
    known = sorted((e["step"], e["batchsched/samples_seen"]) for e in log_history if "batchsched/samples_seen" in e)
    steps = [step for step, _ in known]
    xs, ys = [], []
    for entry in log_history:
        if key in entry and isinstance(entry[key], (int, float)) and math.isfinite(entry[key]):
            step = entry.get("step", 0)
            if "batchsched/samples_seen" in entry:
                x = entry["batchsched/samples_seen"]
            elif known:
                x = known[max(bisect.bisect_right(steps, step) - 1, 0)][1]
            else:
                x = step
            xs.append(x)
            ys.append(entry[key])
    return xs, ys


PLOTTED = (
    ("loss", "train loss"),
    ("eval_loss", "eval loss"),
    ("learning_rate", "learning rate"),
    ("batchsched/batch_size", "batch size (samples / step)"),
    ("sharpness/avg", "sharpness (avg)"),
)


def plot_history(log_history: list[dict], output_dir: str | Path) -> list[str]:
    """Plot loss, eval loss, LR, batch size and sharpness against samples seen, one PNG each plus an overview.

    Series missing from ``log_history`` are skipped. Returns the written paths.
    """
    from .bench.plots import new_figure, panel_row, save_figure, style_axes

    output_dir = Path(output_dir)
    available = [(key, label) for key, label in PLOTTED if _series(log_history, key)[0]]
    paths = []
    x_label = "samples seen" if any("batchsched/samples_seen" in e for e in log_history) else "optimizer step"
    for key, label in available:
        xs, ys = _series(log_history, key)
        figure, axis = new_figure(figsize=(5, 3.2))
        axis.plot(xs, ys, marker="." if len(xs) < 40 else None)
        style_axes(axis, title=label, xlabel=x_label, ylabel=label, legend=False)
        paths.append(save_figure(figure, output_dir / f"{key.replace('/', '_')}.png", dpi=100))
    if available:
        figure, axes = panel_row(len(available), width=3.6, height=3.2)
        for axis, (key, label) in zip(axes, available):
            axis.plot(*_series(log_history, key))
            style_axes(axis, title=label, xlabel=x_label, legend=False)
        paths.append(save_figure(figure, output_dir / "overview.png", dpi=100))
    return paths


def format_summary(result: DemoResult) -> str:
    """The demo's one-screen summary."""
    sizes = sorted(set(result.batch_sizes))
    share = result.trainable_parameters / result.total_parameters if result.total_parameters else 0.0
    if result.base_model_dir is None:
        base = "n/a"
    else:
        how = "trained now" if result.base_trained else "loaded from cache"
        base = f"{result.base_steps} steps of full training on Python's language reference, {how}"
        base += f" ({result.base_time_s:.1f} s)"
    lines = [
        "hf-batchsched demo: LoRA fine-tune of a pretrained small Llama on Python standard-library source code",
        f"  base model        {base}",
        f"  eval loss         base {result.eval_loss_start:.3f} -> fine-tuned {result.eval_loss_end:.3f}",
        f"  eval loss drop    {result.eval_loss_start - result.eval_loss_end:.3f}"
        f" ({100 * result.eval_loss_drop:.1f}% lower)",
        f"  optimizer steps   {result.optimizer_steps}",
        f"  samples seen      {result.samples_seen}",
        f"  batch sizes used  {', '.join(map(str, sizes)) if sizes else 'n/a'}",
        f"  parameters        {result.trainable_parameters:,} trainable (LoRA) of {result.total_parameters:,}"
        f" ({100 * share:.1f}%)",
        f"  wall time         {result.wall_time_s:.1f} s fine-tuning",
        f"  output            {result.output_dir}",
    ]
    if result.base_model_dir is not None:
        lines.insert(2, f"  base model dir    {result.base_model_dir}")
    if result.tensorboard_dir:
        lines.append(f"  tensorboard       tensorboard --logdir {result.tensorboard_dir}")
    if result.plots:
        lines.append(f"  plots             {', '.join(Path(p).name for p in result.plots)}")
    return "\n".join(lines)


def run_demo(
    output_dir: str | Path = "outputs/demo",
    max_steps: int | None = None,
    fast: bool = False,
    overrides: dict | None = None,
    show_progress: bool = True,
) -> DemoResult:
    """Run the demo: the base model (``demo_base_model``, trained or loaded from the cache), then ``DEMO_CONFIG``
    through the recipe with ``model_name_or_path`` set to it; evaluate before and after, plot, summarise.

    Args:
        output_dir (`str` or `Path`, *optional*, defaults to `"outputs/demo"`): where checkpoints-free outputs go:
            TensorBoard events (``runs/``), plots (``plots/``), the LoRA adapter (``adapter/``), ``summary.txt``.
        max_steps (`int`, *optional*): cap on optimizer steps (a reduced budget).
        fast (`bool`, *optional*, defaults to `False`): the CI budget: a 60-step base model (``BASE_TRAINING_FAST``),
            40 fine-tuning steps, a short eval, the ramp and probe scaled down so each still acts.
        overrides (`dict`, *optional*): further recipe settings (any key of the recipe's config).
        show_progress (`bool`, *optional*, defaults to `True`): show the Trainer's progress bar.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base_start = time.perf_counter()
    base_dir, base_trained = demo_base_model(fast=fast)
    base_time = time.perf_counter() - base_start
    base_info = json.loads((base_dir / "base_training.json").read_text())
    config = copy.deepcopy(DEMO_CONFIG)
    config["model_name_or_path"] = str(base_dir)
    config["output_dir"] = str(output_dir)
    config["disable_tqdm"] = not show_progress
    if fast:
        config.update(
            max_steps=40, max_eval_samples=64, eval_steps=20, logging_steps=2,
            batch_schedule={"name": "geometric", "unit": "samples", "start": 8, "factor": 2, "milestones": [160, 320],
                            "max_size": 32},
            sharpness={"every_n_steps": 10, "budget": None},
        )  # fmt: skip
    if max_steps is not None:
        config["max_steps"] = int(max_steps)
    config.update(overrides or {})
    args = parse_config(config)
    start = time.perf_counter()
    seed(args)  # the LoRA init draws from the global RNG before the Trainer seeds it
    model, tokenizer = load_model_and_tokenizer(args)
    train_dataset, eval_dataset = load_data(args, tokenizer)
    trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    # the base model's eval loss, measured before train() reset the state, starts the eval-loss curve at 0 samples
    start_point = {"eval_loss": before, "step": 0, "batchsched/samples_seen": 0}
    plots = plot_history([start_point, *history], Path(output_dir) / "plots")
    adapter_dir = Path(output_dir) / "adapter"
    if hasattr(trainer.model, "peft_config"):  # the adapters only: the head is frozen, the base directory has it
        trainer.model.save_pretrained(adapter_dir, save_embedding_layers=False)
        tokenizer.save_pretrained(adapter_dir)
    else:
        trainer.save_model(str(adapter_dir))
    samples = [e["batchsched/samples_seen"] for e in history if "batchsched/samples_seen" in e]
    result = DemoResult(
        eval_loss_start=before,
        eval_loss_end=after,
        optimizer_steps=trainer.state.global_step,
        samples_seen=trainer.clock.consumed_samples if hasattr(trainer, "clock") else int(max(samples, default=0)),
        batch_sizes=[int(e["batchsched/batch_size"]) for e in history if "batchsched/batch_size" in e],
        wall_time_s=wall,
        output_dir=str(output_dir),
        tensorboard_dir=str(Path(output_dir) / "runs") if (Path(output_dir) / "runs").exists() else None,
        plots=plots,
        trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in trainer.model.parameters()),
        base_model_dir=str(base_dir),
        base_trained=base_trained,
        base_steps=int(base_info["steps"]),
        base_time_s=base_time,
    )
    (Path(output_dir) / "summary.txt").write_text(format_summary(result) + "\n")
    return result
