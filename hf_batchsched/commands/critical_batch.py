"""``hf-batchsched critical-batch``: the critical batch size of each checkpoint of a run, by branch runs.

Usage::

    hf-batchsched critical-batch RUN_DIR (--data demo-code|demo-prose | --text FILE [FILE ...])
        [--batch-sizes 8,16,32,64] [--budget-samples 512] [--lr-rule sqrt] [--tolerance 0.01] [--json PATH]

``RUN_DIR`` is a ``Trainer`` / ``BatchRampTrainer`` output_dir with ``checkpoint-N`` folders (model or LoRA adapter
plus ``optimizer.pt``), or one such folder. Prints a table (B_crit next to the noise scale B_simple per
checkpoint) and writes the JSON to ``--json`` (default ``RUN_DIR/critical_batch.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Measure the critical batch size of a run's checkpoints by branch runs, next to the gradient noise scale."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a Trainer output_dir with checkpoint-N folders, or one checkpoint folder")
    parser.add_argument("--data", choices=("demo-code", "demo-prose"), help="the demo's code or prose text")
    parser.add_argument("--text", nargs="+", help="plain-text files to branch on (the last 10%% of tokens: eval)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else RUN_DIR's)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument(
        "--batch-sizes", default="8,16,32,64", help="branch batch sizes in sequences (default 8,16,32,64)"
    )
    parser.add_argument("--budget-samples", type=int, default=512, help="sequences per branch (default 512)")
    parser.add_argument(
        "--lr-rule", default="sqrt", choices=("sqrt", "linear", "none"), help="LR scaling (default sqrt)"
    )
    parser.add_argument("--learning-rate", type=float, help="LR of the smallest batch (default: the checkpoint's)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative loss excess allowed (default 0.01)")
    parser.add_argument("--base-model", help="base model directory of LoRA checkpoints (default: the adapter's own)")
    parser.add_argument("--fresh-optimizer", action="store_true", help="ignore optimizer.pt's moments")
    parser.add_argument("--eval-samples", type=int, default=256, help="held-out sequences (default 256)")
    parser.add_argument(
        "--noise-repeats", type=int, default=4, help="batches for the noise scale (default 4; 0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="where the JSON goes (default RUN_DIR/critical_batch.json)")


def _tokenizer(args, checkpoint: Path):
    from transformers import AutoTokenizer

    from ..errors import ConfigError

    for candidate in [args.tokenizer, checkpoint, Path(args.run_dir)]:
        if candidate and (Path(candidate) / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(candidate))
    raise ConfigError(f"no tokenizer saved in {checkpoint} or {args.run_dir}; pass --tokenizer DIR")


def _texts(args) -> tuple[list[str], list[str] | None]:
    from ..errors import ConfigError

    if (args.data is None) == (args.text is None):
        raise ConfigError("pass the text to branch on: --data demo-code, --data demo-prose or --text FILE [FILE ...]")
    if args.text:
        missing = [t for t in args.text if not Path(t).is_file()]
        if missing:
            raise ConfigError(f"--text file(s) not found: {', '.join(missing)}")
        return [Path(t).read_text(encoding="utf-8", errors="replace") for t in args.text], None
    from .. import assets

    if args.data == "demo-code":
        train, held_out = assets.demo_corpus()
        return train, held_out
    texts = list(assets.base_corpus())
    return [t for i, t in enumerate(texts) if i % 8 != 7], [t for i, t in enumerate(texts) if i % 8 == 7]


def _ids(tokenizer, texts) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or 0])
    return ids


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .. import critical_batch as cb
    from ..errors import ConfigError, check_positive

    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
    check_positive("--eval-samples", args.eval_samples)
    checkpoints = cb.find_checkpoints(args.run_dir)
    train_texts, eval_texts = _texts(args)
    tokenizer = _tokenizer(args, checkpoints[0])
    if eval_texts is None:
        ids = _ids(tokenizer, train_texts)
        cut = int(len(ids) * 0.9)
        train_ids, eval_ids = ids[:cut], ids[cut:]
    else:
        train_ids, eval_ids = _ids(tokenizer, train_texts), _ids(tokenizer, eval_texts)
    train_rows = cb.windows(train_ids, args.seq_length)
    eval_rows = cb.windows(eval_ids, args.seq_length)[: args.eval_samples]
    results = cb.measure_checkpoints(
        args.run_dir,
        train_rows,
        eval_rows,
        learning_rate=args.learning_rate,
        fresh_optimizer=args.fresh_optimizer,
        base_model=args.base_model,
        batch_sizes=sizes,
        budget_samples=args.budget_samples,
        lr_rule=None if args.lr_rule == "none" else args.lr_rule,
        tolerance=args.tolerance,
        noise_repeats=args.noise_repeats,
        seed=args.seed,
    )
    print(cb.format_table(results))
    target = Path(args.json) if args.json else Path(args.run_dir) / "critical_batch.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    print(f"wrote {target}")
    return 0
