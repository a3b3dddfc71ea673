"""The demo's base model: ``demo_model`` trained in full on Python's language reference, cached on disk."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from .models import demo_model
from .text import base_corpus, cache_dir, demo_corpus, demo_tokenizer

__all__ = ["BASE_TRAINING", "BASE_TRAINING_FAST", "demo_base_model"]

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
