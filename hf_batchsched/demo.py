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

Example:

>>> corpus = stdlib_corpus(modules=("json", "textwrap"))
>>> sorted(corpus)
['json', 'textwrap']
>>> "def dumps(" in corpus["json"]
True
"""

from __future__ import annotations

import ast
import bisect
import copy
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BASE_TRAINING",
    "BASE_TRAINING_FAST",
    "DEMO_CONFIG",
    "DEMO_MODULES",
    "DEMO_TRAIN_CHARS",
    "DemoResult",
    "base_corpus",
    "cache_dir",
    "code_chunks",
    "demo_base_model",
    "demo_corpus",
    "demo_model",
    "demo_tokenizer",
    "format_summary",
    "plot_history",
    "run_demo",
    "stdlib_corpus",
]

# Pure-Python standard-library modules whose source code is the fine-tuning text (4.1 MB with Python 3.11, of which
# DEMO_TRAIN_CHARS are used). Modules without a .py file in a Python build (frozen or missing) are skipped.
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
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
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
    "sharpness": {"every_n_steps": 25, "budget": None},
    "eval_strategy": "steps",
    "eval_steps": 50,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": ["tensorboard"],
    "seed": 0,
    "dataloader_num_workers": 0,
}


# Stage 1, the base model: full training of ``demo_model`` on Python's language reference (``base_corpus``) with
# AdamW, linear warmup then cosine decay, batches of random 64-token windows. The budget is about 25 s on one CPU
# thread; ``--fast`` uses BASE_TRAINING_FAST (its own cache entry). Part of the base model's cache key.
BASE_TRAINING: dict = {
    "steps": 600,
    "batch_size": 16,
    "seq_length": 64,
    "learning_rate": 3e-3,
    "warmup_steps": 30,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "vocab_size": 512,
    "seed": 0,
}
BASE_TRAINING_FAST: dict = {**BASE_TRAINING, "steps": 60}

# Characters of training code the fine-tune reads: a fixed sample of the training modules' pieces (``demo_corpus``),
# about 5,600 sequences of 64 tokens: one pass is ~400 optimizer steps (~25 s on one CPU thread).
DEMO_TRAIN_CHARS = 780_000


def cache_dir() -> Path:
    """Where the demo caches its tokenizer and base model: ``$HF_BATCHSCHED_CACHE``, else
    ``~/.cache/hf_batchsched``."""
    return Path(os.environ.get("HF_BATCHSCHED_CACHE", Path.home() / ".cache" / "hf_batchsched")).expanduser()


def _definition_start(node: ast.AST) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def code_chunks(source: str) -> list[str]:
    """Cut Python source into definition-sized pieces: one per top-level statement, with each method of a
    top-level class a piece of its own. A piece starts at its statement (or its first decorator) and runs to the
    next one; surrounding blank lines are dropped.

    Args:
        source (`str`): the text of a Python file.

    Returns:
        `list[str]`: the pieces, in file order; joined with newlines they give back every non-blank line.

    >>> code_chunks("import os\\n\\nclass A:\\n    x = 1\\n\\n    @property\\n    def f(self):\\n        return 2\\n")
    ['import os', 'class A:\\n    x = 1', '    @property\\n    def f(self):\\n        return 2']
    """
    lines = source.splitlines(keepends=True)
    starts = {1}
    for node in ast.parse(source).body:
        starts.add(_definition_start(node))
        if isinstance(node, ast.ClassDef):
            starts.update(
                _definition_start(member)
                for member in node.body
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    cuts = sorted(starts) + [len(lines) + 1]
    pieces = ("".join(lines[start - 1 : end - 1]).strip("\n") for start, end in zip(cuts, cuts[1:]))
    return [piece for piece in pieces if piece.strip()]


def stdlib_corpus(modules: tuple[str, ...] = DEMO_MODULES) -> dict[str, str]:
    """The Python source of each standard-library module in ``modules``, read from its file (nothing is imported).

    Args:
        modules (`tuple[str, ...]`, *optional*, defaults to `DEMO_MODULES`): dotted module names; those without
            a ``.py`` source file in this interpreter (frozen or built-in ones, such as ``os`` on 3.11) are skipped.

    Returns:
        `dict[str, str]`: module name -> its source text, in ``modules`` order.
    """
    corpus = {}
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py"):
            corpus[name] = Path(origin).read_text(encoding="utf-8")
    return corpus


def _digest_order(texts: list[str]) -> list[str]:
    """A fixed shuffle: sorted by content hash, so it depends on nothing but the texts."""
    return sorted(texts, key=lambda text: hashlib.sha256(text.encode()).digest())


@functools.lru_cache(maxsize=4)
def demo_corpus(eval_every: int = 8, max_train_chars: int | None = DEMO_TRAIN_CHARS) -> tuple[list[str], list[str]]:
    """The fine-tuning text: ``stdlib_corpus()`` cut into ``code_chunks``, split by module, every
    ``eval_every``-th module (in ``stdlib_corpus`` order) held out for evaluation.

    Both splits come in a fixed shuffled order (sorted by content hash), so any prefix, such as the recipe's
    ``max_eval_samples`` sequences, spans many modules. The training split is then cut to its first pieces
    totalling ``max_train_chars`` characters, a deterministic sample of every training module that keeps the demo
    short.

    Args:
        eval_every (`int`, *optional*, defaults to `8`): hold out every ``eval_every``-th module.
        max_train_chars (`int`, *optional*, defaults to `DEMO_TRAIN_CHARS`): character budget of the training
            split; `None` keeps all of it (about 3.7 MB with Python 3.11).

    Returns:
        `tuple[list[str], list[str]]`: training pieces and held-out pieces; cached, do not modify them.
    """
    train, held_out = [], []
    for index, source in enumerate(stdlib_corpus().values()):
        (held_out if index % eval_every == eval_every - 1 else train).extend(code_chunks(source))
    train = _digest_order(train)
    if max_train_chars is not None:
        total, keep = 0, 0
        while keep < len(train) and total < max_train_chars:
            total += len(train[keep])
            keep += 1
        train = train[:keep]
    return train, _digest_order(held_out)


@functools.lru_cache(maxsize=1)
def base_corpus() -> tuple[str, ...]:
    """The base model's text: the topics of Python's language reference that ``help()`` shows (``pydoc_data.topics``,
    about 0.46 MB with Python 3.11), read from the source file with ``ast`` (nothing is imported).

    Returns:
        `tuple[str, ...]`: one text per topic (``"assert"``, ``"for"``, ``"numbers"``, ...), in file order.

    Raises:
        `ConfigError`: when this Python build ships no ``pydoc_data/topics.py``.
    """
    from .errors import ConfigError

    spec = importlib.util.find_spec("pydoc_data.topics")
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        raise ConfigError(
            "the demo's base model trains on pydoc_data/topics.py, which this Python build lacks; "
            "install the full standard library (e.g. Debian's libpython3-stdlib) to run the demo"
        )
    for node in ast.parse(Path(origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return tuple(str(text) for text in ast.literal_eval(node.value).values())
    raise ConfigError(f"{origin} holds no 'topics' dict; the demo cannot build its base model")


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


def _base_key(settings: dict, tokenizer, texts: tuple[str, ...]) -> str:
    import torch
    import transformers

    model_config = demo_model(len(tokenizer)).config.to_json_string(use_diff=False)
    parts = [
        json.dumps(settings, sort_keys=True),
        model_config,
        tokenizer.backend_tokenizer.to_str(),
        hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        torch.__version__,
        transformers.__version__,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _train_base(model, tokenizer, texts: tuple[str, ...], settings: dict) -> dict:
    """Train all of ``model`` on ``texts`` (joined with EOS, random ``seq_length`` windows); returns stats."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    length, steps = settings["seq_length"], settings["steps"]
    stream = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"]
    )
    warmup = settings["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        offsets = torch.randint(len(stream) - length, (settings["batch_size"],), generator=generator)
        batch = torch.stack([stream[o : o + length] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {
        "steps": steps,
        "tokens": len(ids),
        "train_loss_start": losses[0] if losses else None,
        "train_loss_end": sum(tail) / len(tail) if tail else None,
        "seconds": time.perf_counter() - start,
    }


def demo_base_model(fast: bool = False, directory: str | Path | None = None) -> tuple[Path, bool]:
    """Stage 1 of the demo: the base model, ``demo_model`` trained in full on ``base_corpus()`` and cached.

    The tokenizer (``demo_tokenizer``, 512 tokens) is trained on the base text plus the demo's training code
    (``demo_corpus()[0]``), so both stages share it. The result is saved with ``save_pretrained`` (model, tokenizer and
    ``base_training.json`` with its settings and losses) under ``<cache>/demo-base-<key>``, where the key hashes the
    training settings, model config, tokenizer, text and torch/transformers versions: later calls load it instead
    of training. The directory is written whole, then renamed into place, so a concurrent reader sees all or
    nothing. Training is seeded and runs on one CPU thread (about 25 s for ``BASE_TRAINING``), so it is repeatable.

    Args:
        fast (`bool`, *optional*, defaults to `False`): use ``BASE_TRAINING_FAST`` (60 steps) instead of
            ``BASE_TRAINING`` (600 steps); the two are cached separately.
        directory (`str` or `Path`, *optional*): the cache root; defaults to ``cache_dir()``.

    Returns:
        `tuple[Path, bool]`: the directory to pass as ``model_name_or_path``, and whether this call trained it
        (`False`: loaded from the cache).
    """
    import torch

    settings = dict(BASE_TRAINING_FAST if fast else BASE_TRAINING)
    texts = base_corpus()
    root = Path(directory or cache_dir())
    tokenizer = demo_tokenizer(list(texts) + demo_corpus()[0], vocab_size=settings["vocab_size"], directory=root)
    path = root / f"demo-base-{_base_key(settings, tokenizer, texts)}"
    if (path / "base_training.json").exists():
        return path, False
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=root))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one thread: steady on a busy machine, where two can stall each other
        with torch.random.fork_rng():
            torch.manual_seed(settings["seed"])
            model = demo_model(len(tokenizer), seed=settings["seed"])
            stats = _train_base(model, tokenizer, texts, settings)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"settings": settings, "corpus": "pydoc_data/topics.py", **stats}
        (staging / "base_training.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            staging.rename(path)
        except OSError:  # another process finished first: keep its copy
            if not (path / "base_training.json").exists():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return path, True


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
    from .recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config

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
    from transformers import set_seed

    set_seed(args.training.seed)  # the LoRA init draws from the global RNG before the Trainer seeds it
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
