"""The critical batch size, measured directly by branch runs (Merrill et al. 2025, https://arxiv.org/abs/2505.23971).

From a checkpoint (model + optimizer state), ``critical_batch_size`` trains one short branch per batch size ``B`` in
``batch_sizes``, every branch on the *same* ``budget_samples`` sequences (so the comparison is at equal tokens), with
a constant LR scaled from the smallest batch ``B_min`` by ``lr_rule`` (``"sqrt"``: ``lr (B / B_min) ** 0.5``, Adam's
rule; ``"linear"``: SGD's; ``None``: unscaled), and measures each branch's eval loss. ``B_crit`` is the largest ``B``
such that this and every smaller branch ends within ``tolerance`` (relative, default 1%) of the ``B_min`` branch:
beyond it, a bigger batch costs loss at equal tokens. Next to it is the gradient noise scale ``B_simple`` (McCandlish
et al. 2018) at the same point, from the project's two-batch estimator (``probes.noise_scale``), averaged over
``noise_repeats`` batches of ``max(batch_sizes)`` sequences split into chunks of ``B_min``: the cheap proxy, to see
whether it agrees with the direct measure on a task.

``measure_checkpoints(run_dir, ...)`` does this for every ``checkpoint-*`` folder of a ``Trainer`` /
``BatchRampTrainer`` run (``hf-batchsched critical-batch`` on the command line). The branch budget must be large
enough that the loss moves by more than ``tolerance`` across it; ``loss_start`` and the per-branch losses are
reported so this can be checked.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .batching import split_batch
from .errors import ConfigError, check_positive
from .probes.noise_scale import estimate_noise_scale

__all__ = [
    "CriticalBatchResult",
    "critical_batch_size",
    "eval_loss",
    "find_checkpoints",
    "format_table",
    "measure_checkpoints",
    "trainer_param_groups",
    "windows",
]

LR_RULES = {"sqrt": 0.5, "linear": 1.0, None: 0.0}


@dataclass
class CriticalBatchResult:
    """One checkpoint's measurement; ``losses[i]`` is the branch loss at ``batch_sizes[i]``."""

    b_crit: int
    batch_sizes: list[int]
    losses: list[float]
    learning_rates: list[float]
    loss_start: float
    budget_samples: int
    tolerance: float
    noise_scale: float | None
    step: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def windows(ids: Sequence[int], seq_length: int) -> torch.Tensor:
    """Non-overlapping ``seq_length``-token rows of a token stream, as a ``(N, seq_length)`` long tensor."""
    check_positive("seq_length", seq_length)
    n = len(ids) // seq_length
    if n < 1:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_length}; give more text")
    return torch.tensor(list(ids[: n * seq_length]), dtype=torch.long).view(n, seq_length)


def trainer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The param groups ``Trainer.create_optimizer`` builds (decayed weights, then the rest), trainable only."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def _lm_loss(model, chunk):
    return model(input_ids=chunk, labels=chunk).loss


@torch.no_grad()
def eval_loss(model, eval_rows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss of ``model`` over ``eval_rows`` (token ids, one sequence a row), in eval mode and
    without gradients, ``batch_size`` rows at a time; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in split_batch(eval_rows, batch_size):
        total += float(_lm_loss(model, chunk)) * len(chunk)
    model.train(was_training)
    return total / len(eval_rows)


def _branch(
    model, optimizer_state, rows, batch_size, lr, weight_decay, betas, max_grad_norm, micro
) -> torch.nn.Module:
    branch = copy.deepcopy(model)
    branch.train()
    groups = trainer_param_groups(branch, weight_decay)
    if optimizer_state is not None:
        sizes = [len(g["params"]) for g in optimizer_state["param_groups"]]
        groups = [g for g in groups if g["params"]] if len(sizes) < len(groups) else groups
        if sizes != [len(g["params"]) for g in groups]:
            raise ConfigError(
                f"the checkpoint's optimizer has param groups of {sizes} tensors but the model's trainable parameters "
                f"split into {[len(g['params']) for g in groups]} (Trainer's decay / no-decay groups); pass the "
                "checkpoint of a Trainer run with AdamW, or measure without optimizer state (--fresh-optimizer)"
            )
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:
        group["lr"], group["betas"] = lr, betas
    params = [p for g in groups for p in g["params"]]
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        batch = rows[start : start + batch_size]
        for chunk in split_batch(batch, micro):
            (_lm_loss(branch, chunk) * (len(chunk) / batch_size)).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return branch


def critical_batch_size(
    model: torch.nn.Module,
    train_rows: torch.Tensor,
    eval_rows: torch.Tensor,
    *,
    batch_sizes: Sequence[int],
    budget_samples: int,
    learning_rate: float,
    lr_rule: str | None = "sqrt",
    tolerance: float = 0.01,
    optimizer_state: dict | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float | None = 1.0,
    max_micro_batch_size: int = 32,
    noise_repeats: int = 4,
    seed: int = 0,
) -> CriticalBatchResult:
    """Branch runs from ``model`` (and its AdamW ``optimizer_state``) at each of ``batch_sizes``; see the module doc.

    Args:
        model (`torch.nn.Module`): a causal LM at the checkpoint (left unchanged; branches train deep copies).
        train_rows (`torch.Tensor`): ``(N, L)`` token rows to branch on; the first ``budget_samples`` of a seeded
            shuffle are used by every branch, in the same order.
        eval_rows (`torch.Tensor`): held-out ``(M, L)`` rows; each branch's final mean loss on them is compared.
        batch_sizes (`Sequence[int]`): the branch batch sizes (sequences); each must divide ``budget_samples``.
        budget_samples (`int`): sequences each branch trains on.
        learning_rate (`float`): the constant LR of the smallest batch's branch.
        lr_rule (`str`, *optional*, defaults to `"sqrt"`): ``"sqrt"``, ``"linear"`` or ``None`` (see module doc).
        tolerance (`float`, *optional*, defaults to `0.01`): relative loss excess still counted as "as good".
        optimizer_state (`dict`, *optional*): the checkpoint's AdamW ``state_dict`` (Trainer param groups); without
            it each branch starts Adam from zero moments.
        weight_decay, betas, max_grad_norm: the branch optimizer's settings.
        max_micro_batch_size (`int`, *optional*, defaults to `32`): most sequences per forward/backward.
        noise_repeats (`int`, *optional*, defaults to `4`): batches averaged by the noise-scale estimate (0: skip).
        seed (`int`, *optional*, defaults to `0`): the data order and the noise-scale batches.

    Returns:
        `CriticalBatchResult`.
    """
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    check_positive("budget_samples", budget_samples)
    check_positive("learning_rate", learning_rate)
    if lr_rule not in LR_RULES:
        raise ConfigError(f"lr_rule must be 'sqrt', 'linear' or None, got {lr_rule!r}")
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance is a relative loss excess in (0, 1), e.g. 0.01, got {tolerance}")
    bad = [b for b in sizes if budget_samples % b]
    if bad:
        raise ConfigError(
            f"budget_samples={budget_samples} is not a multiple of batch size(s) {bad}, so branches would see "
            "different data; pick a budget that every batch size divides (e.g. a power of two)"
        )
    if len(train_rows) < budget_samples:
        raise ConfigError(
            f"budget_samples={budget_samples} exceeds the {len(train_rows)} training sequences; "
            "lower it or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    rows = train_rows[torch.randperm(len(train_rows), generator=generator)[:budget_samples]]
    loss_start = eval_loss(model, eval_rows)
    losses, lrs = [], []
    exponent = LR_RULES[lr_rule]
    with torch.random.fork_rng():
        for b in sizes:
            torch.manual_seed(seed)
            lr = learning_rate * (b / sizes[0]) ** exponent
            micro = max(d for d in range(1, min(b, max_micro_batch_size) + 1) if b % d == 0)
            branch = _branch(model, optimizer_state, rows, b, lr, weight_decay, betas, max_grad_norm, micro)
            losses.append(eval_loss(branch, eval_rows))
            lrs.append(lr)
            del branch
    b_crit = sizes[0]
    for b, loss in zip(sizes[1:], losses[1:]):
        if not loss <= losses[0] * (1 + tolerance):
            break
        b_crit = b
    noise = _noise_scale(model, train_rows, sizes, noise_repeats, generator) if noise_repeats else None
    return CriticalBatchResult(b_crit, sizes, losses, lrs, loss_start, budget_samples, tolerance, noise)


def _noise_scale(model, train_rows, sizes, repeats, generator) -> float | None:
    """``B_simple = tr(Sigma) / |G|^2`` from ``repeats`` two-batch measurements (``B_min`` vs ``B_max`` sequences)."""
    small, big = sizes[0], sizes[-1]
    if big < 2 * small or len(train_rows) < big:
        return None
    was_training = model.training
    model.train()
    g2 = trace = 0.0
    try:
        for _ in range(repeats):
            batch = train_rows[torch.randperm(len(train_rows), generator=generator)[:big]]
            sample = estimate_noise_scale(model, _lm_loss, batch[: big - big % small], micro_batch_size=small)
            g, s = sample.estimate()
            g2, trace = g2 + g, trace + s
    finally:
        model.train(was_training)
    return trace / g2 if g2 > 0 else None


# --------------------------------------------------------------------------------------------------
# Checkpoints of a run
# --------------------------------------------------------------------------------------------------


def find_checkpoints(path: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` subfolders of ``path`` in step order, else ``path`` itself when it is a checkpoint
    (holds ``config.json`` or ``adapter_config.json``, e.g. a run's final save); a ``ConfigError`` when neither."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass a Trainer output_dir or one of its checkpoint-N folders")
    found = [p for p in path.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and _is_checkpoint(p)]
    if not found and _is_checkpoint(path):
        return [path]
    if not found:
        raise ConfigError(
            f"{path} holds no checkpoint-N folders with a saved model; train with save_strategy='steps' (or pass a "
            "checkpoint folder itself)"
        )
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def load_checkpoint(path: Path, base_model: str | Path | None = None):
    """``(model, optimizer_state or None, step or None)`` of one checkpoint folder (a PEFT adapter or a full model).

    An adapter is loaded on ``base_model`` if given, else on the base its ``adapter_config.json`` names; a model that
    cannot be loaded is a ``ConfigError`` naming the folder."""
    from transformers import AutoModelForCausalLM

    try:
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            base = base_model or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ConfigError(
                    f"the adapter in {path} names no base model (adapter_config.json has no base_model_name_or_path); "
                    "pass the base model's directory with --base-model (Python: base_model=...)"
                )
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(str(base)), str(path), is_trainable=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path))
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load the model of checkpoint {path}: {first}") from None
    state = None
    if (path / "optimizer.pt").exists():
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    step = None
    if (path / "trainer_state.json").exists():
        step = json.loads((path / "trainer_state.json").read_text()).get("global_step")
    return model, state, step


def measure_checkpoints(
    run_dir: str | Path,
    train_rows: torch.Tensor,
    eval_rows: torch.Tensor,
    *,
    learning_rate: float | None = None,
    fresh_optimizer: bool = False,
    base_model: str | Path | None = None,
    **kwargs,
) -> list[CriticalBatchResult]:
    """``critical_batch_size`` at every checkpoint of ``run_dir`` (see ``find_checkpoints``).

    The LR, betas and weight decay come from the checkpoint's saved AdamW param groups (group 0: the LR the run
    was at) unless ``learning_rate`` is given; ``fresh_optimizer`` ignores the saved moments. ``base_model``: the
    base of adapter checkpoints whose config names none (see ``load_checkpoint``).
    """
    results = []
    for path in find_checkpoints(run_dir):
        model, state, step = load_checkpoint(path, base_model)
        lr, settings = learning_rate, {}
        if state is not None:
            group = state["param_groups"][0]
            lr = lr if lr is not None else float(group["lr"])
            settings = {
                "betas": tuple(group.get("betas", (0.9, 0.999))),
                "weight_decay": group.get("weight_decay", 0.0),
            }
        if lr is None or not lr > 0:
            raise ConfigError(
                f"{path} has no optimizer.pt with a positive LR to branch at (e.g. the end of a decay); "
                "pass --learning-rate"
            )
        result = critical_batch_size(
            model,
            train_rows,
            eval_rows,
            learning_rate=lr,
            optimizer_state=None if fresh_optimizer else state,
            **{**settings, **kwargs},
        )
        result.step = step
        result.extra["checkpoint"] = str(path)
        results.append(result)
    return results


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(results: Sequence[CriticalBatchResult]) -> str:
    """A plain-text table: one row per checkpoint with B_crit, B_simple, the start loss and each branch's loss."""
    if not results:
        return "(no checkpoints)"
    sizes = results[0].batch_sizes
    header = ["step", "B_crit", "B_simple", "loss_start"] + [f"loss@B={b}" for b in sizes]
    lines = [header]
    for r in results:
        lines.append(
            [_fmt(r.step), str(r.b_crit), _fmt(r.noise_scale), _fmt(r.loss_start)] + [_fmt(x) for x in r.losses]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)
