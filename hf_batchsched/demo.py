"""The offline demo: a LoRA fine-tune of a small Llama on text that ships with Python, with no network.

``hf-batchsched demo`` runs the bundled recipe (``hf_batchsched.recipe``) with ``DEMO_CONFIG``, the same
settings as ``recipes/configs/demo_cpu.yaml``:

- **Text**: the docstrings of about a hundred pure-Python standard-library modules (``argparse``, ``json``,
  ``pathlib``, ...), read from their source files with ``ast`` (nothing is imported). Whole modules are held
  out for evaluation, so the eval loss measures how well the model writes Python-documentation English it has
  not seen, not memorisation.
- **Tokenizer**: a byte-level BPE (``tokenizers``) trained on the training split, cached under the cache
  directory (``$HF_BATCHSCHED_CACHE`` or ``~/.cache/hf_batchsched``), keyed by a hash of its training text.
- **Model**: a fresh ``LlamaForCausalLM`` (hidden 128, 2 layers, 4 heads), adapted with LoRA on every linear
  layer plus trainable embeddings and output head (``modules_to_save``): a LoRA fine-tune of a model that
  starts from scratch, so the eval loss starts at about ``ln(vocab_size)``.
- **Training**: a batch-size ramp (8 -> 32 samples per step, micro-batch 8), an LR policy on the samples
  clock, the sharpness probe, TensorBoard event files, PNG plots and a one-screen summary.

Example:

>>> corpus = stdlib_corpus(modules=("json", "textwrap"))
>>> sorted(corpus)
['json', 'textwrap']
>>> "JSON" in corpus["json"]
True
"""

from __future__ import annotations

import ast
import bisect
import copy
import functools
import hashlib
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEMO_CONFIG",
    "DEMO_MODULES",
    "DemoResult",
    "cache_dir",
    "demo_corpus",
    "demo_model",
    "demo_tokenizer",
    "format_summary",
    "plot_history",
    "run_demo",
    "stdlib_corpus",
]

# Pure-Python standard-library modules whose docstrings form the demo's text (about 0.5 MB with Python 3.11).
# Modules missing from a Python build are skipped.
DEMO_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd",
    "codecs", "collections", "colorsys", "concurrent.futures._base", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookies", "http.server",
    "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "json", "keyword", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip

# The demo's recipe settings; recipes/configs/demo_cpu.yaml holds the same values with a comment per knob
# (tests/test_demo.py checks that the two agree).
DEMO_CONFIG: dict = {
    "model_name_or_path": None,
    "peft": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
    "lora_modules_to_save": ["embed_tokens", "lm_head"],
    "max_seq_length": 64,
    "output_dir": "outputs/demo",
    "num_train_epochs": 1,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 64,
    "max_eval_samples": 256,
    "learning_rate": 3e-3,
    "weight_decay": 0.0,
    "batch_schedule": {
        "name": "geometric",
        "unit": "samples",
        "start": 8,
        "factor": 2,
        "milestones": [1800, 3600],
        "max_size": 32,
    },
    "max_micro_batch_size": 8,
    "lr_policy": {"name": "warmup", "unit": "samples", "warmup": 400, "policy": "constant"},
    "sharpness": {"every_n_steps": 25},
    "eval_strategy": "steps",
    "eval_steps": 50,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": ["tensorboard"],
    "seed": 0,
    "dataloader_num_workers": 0,
}


def cache_dir() -> Path:
    """Where the demo caches its tokenizer: ``$HF_BATCHSCHED_CACHE``, else ``~/.cache/hf_batchsched``."""
    return Path(os.environ.get("HF_BATCHSCHED_CACHE", Path.home() / ".cache" / "hf_batchsched")).expanduser()


def _docstrings(tree: ast.AST) -> list[str]:
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text and len(text) >= 40:
                texts.append(text)
    return texts


def stdlib_corpus(modules: tuple[str, ...] = DEMO_MODULES) -> dict[str, str]:
    """The docstrings of each standard-library module in ``modules``, joined per module (source read, not imported).

    Args:
        modules (`tuple[str, ...]`, *optional*, defaults to `DEMO_MODULES`): dotted module names; those without
            Python source in this interpreter are skipped.

    Returns:
        `dict[str, str]`: module name -> its docstrings (module, classes, functions, methods), blank-line separated.
    """
    corpus = {}
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):
            continue
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        texts = _docstrings(tree)
        if texts:
            corpus[name] = "\n\n".join(texts)
    return corpus


@functools.lru_cache(maxsize=4)
def demo_corpus(eval_every: int = 8) -> tuple[list[str], list[str]]:
    """Split ``stdlib_corpus()`` into training and held-out texts by module: every ``eval_every``-th module
    (in ``DEMO_MODULES`` order) is held out.

    Returns:
        `tuple[list[str], list[str]]`: training texts and evaluation texts (one docstring each); cached, do not
        modify them.
    """
    train, held_out = [], []
    for index, text in enumerate(stdlib_corpus().values()):
        (held_out if index % eval_every == eval_every - 1 else train).extend(text.split("\n\n"))
    return train, held_out


def demo_tokenizer(texts: list[str], vocab_size: int = 512, directory: str | Path | None = None):
    """A byte-level BPE tokenizer trained on ``texts``, cached on disk and reloaded when the texts are the same.

    Args:
        texts (`list[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to `512`): vocabulary size, special tokens included.
        directory (`str` or `Path`, *optional*): the cache root; defaults to ``cache_dir()``.

    Returns:
        `transformers.PreTrainedTokenizerFast` with ``<pad>`` (id 0), ``<s>`` (1) and ``</s>`` (2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(("\0".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = Path(directory or cache_dir()) / f"demo-tokenizer-{digest}"
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    if not (path / "tokenizer.json").exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
        fast.save_pretrained(path)  # written whole, then visible: a concurrent reader sees all or nothing
    return PreTrainedTokenizerFast.from_pretrained(path)


def demo_model(vocab_size: int, seed: int = 0, attn_implementation: str | None = None):
    """A freshly initialised ``LlamaForCausalLM`` for the demo: hidden 128, 2 layers, 4 heads, context 128.

    About 0.46 M parameters with ``vocab_size=512``:

    >>> sum(p.numel() for p in demo_model(512).parameters())
    459392
    """
    from .testing import tiny_llama

    return tiny_llama(
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        attn_implementation=attn_implementation or "sdpa",
    )


@dataclass
class DemoResult:
    """What the demo did: the numbers of its summary and where its files are."""

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    available = [(key, label) for key, label in PLOTTED if _series(log_history, key)[0]]
    paths = []
    x_label = "samples seen" if any("batchsched/samples_seen" in e for e in log_history) else "optimizer step"
    for key, label in available:
        xs, ys = _series(log_history, key)
        figure, axis = plt.subplots(figsize=(5, 3.2))
        axis.plot(xs, ys, marker="." if len(xs) < 40 else None)
        axis.set(xlabel=x_label, ylabel=label, title=label)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = output_dir / f"{key.replace('/', '_')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(str(path))
    if available:
        figure, axes = plt.subplots(1, len(available), figsize=(3.6 * len(available), 3.2))
        for axis, (key, label) in zip(list(getattr(axes, "flat", [axes])), available):
            axis.plot(*_series(log_history, key))
            axis.set(xlabel=x_label, title=label)
            axis.grid(alpha=0.3)
        figure.tight_layout()
        path = output_dir / "overview.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(str(path))
    return paths


def format_summary(result: DemoResult) -> str:
    """The demo's one-screen summary."""
    sizes = sorted(set(result.batch_sizes))
    lines = [
        "hf-batchsched demo: LoRA fine-tune of a small Llama on Python standard-library docstrings",
        f"  eval loss         {result.eval_loss_start:.3f} -> {result.eval_loss_end:.3f}"
        f"  ({100 * result.eval_loss_drop:.1f}% lower)",
        f"  optimizer steps   {result.optimizer_steps}",
        f"  samples seen      {result.samples_seen}",
        f"  batch sizes used  {', '.join(map(str, sizes)) if sizes else 'n/a'}",
        f"  parameters        {result.trainable_parameters:,} trainable of {result.total_parameters:,}",
        f"  wall time         {result.wall_time_s:.1f} s",
        f"  output            {result.output_dir}",
    ]
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
    """Run the demo: ``DEMO_CONFIG`` through the recipe, evaluate before and after, plot, summarise.

    Args:
        output_dir (`str` or `Path`, *optional*, defaults to `"outputs/demo"`): where checkpoints-free outputs go:
            TensorBoard events (``runs/``), plots (``plots/``), the LoRA adapter (``adapter/``), ``summary.txt``.
        max_steps (`int`, *optional*): cap on optimizer steps (a reduced budget).
        fast (`bool`, *optional*, defaults to `False`): the CI budget: 40 steps, a short eval, the ramp and
            probe scaled down so each still acts.
        overrides (`dict`, *optional*): further recipe settings (any key of the recipe's config).
        show_progress (`bool`, *optional*, defaults to `True`): show the Trainer's progress bar.
    """
    from .recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config

    config = copy.deepcopy(DEMO_CONFIG)
    config["output_dir"] = str(output_dir)
    config["disable_tqdm"] = not show_progress
    if fast:
        config.update(
            max_steps=40, max_eval_samples=64, eval_steps=20, logging_steps=2,
            batch_schedule={"name": "geometric", "unit": "samples", "start": 8, "factor": 2, "milestones": [160, 320],
                            "max_size": 32},
            sharpness={"every_n_steps": 10},
        )  # fmt: skip
    if max_steps is not None:
        config["max_steps"] = int(max_steps)
    config.update(overrides or {})
    args = parse_config(config)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args)
    train_dataset, eval_dataset = load_data(args, tokenizer)
    trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    plots = plot_history(history, Path(output_dir) / "plots")
    trainer.save_model(str(Path(output_dir) / "adapter"))
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
    )
    (Path(output_dir) / "summary.txt").write_text(format_summary(result) + "\n")
    return result
