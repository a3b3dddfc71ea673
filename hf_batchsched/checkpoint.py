"""Checkpoints of a ``BatchRampTrainer``: when one is complete, which one a resume uses, what a resume checks.

The ramp state (the clock, the sampler's stream position in dataset rows, the global batch size of every step so
far, and a fingerprint of what the batch plan depends on) lives in the checkpoint's ``trainer_state.json``, under
``stateful_callbacks["hf_batchsched.BatchRampTrainer"]``; there is no other file. The Trainer writes
``trainer_state.json`` after the model, optimizer, scheduler and RNG files and before it deletes old checkpoints
(``save_total_limit``), and ``BatchRampTrainer`` writes it atomically (a temporary file, then a rename) with the
list of the checkpoint's other files. So a checkpoint is **complete** when its ``trainer_state.json`` reads as JSON,
holds the ramp state, and every file it lists exists. A crash at any moment of a save leaves the checkpoint being
written recognisably incomplete and the previous complete one in place:

- ``resume_from_checkpoint=True`` resumes from the newest complete checkpoint and logs, in one line, the
  incomplete ones it passed over;
- an explicit path to an incomplete checkpoint is refused with what is missing and the newest complete one;
- a damaged state (not JSON, a list, missing keys, a string where a count belongs) is refused with a
  ``ConfigError`` naming the file, what is wrong and what to do.

Example:

>>> import os, tempfile
>>> folder = os.path.join(tempfile.mkdtemp(), "checkpoint-3")
>>> os.makedirs(folder)
>>> find_resume_checkpoint(folder, os.path.dirname(folder))
Traceback (most recent call last):
...
hf_batchsched.errors.ConfigError: checkpoint .../checkpoint-3 is incomplete: trainer_state.json is missing ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError

__all__ = [
    "PLAN_KEYS",
    "RAMP_STATE_KEY",
    "STATE_KEYS",
    "STREAM_KEYS",
    "TRAINER_STATE_FILE",
    "ResumePoint",
    "append_batch_size",
    "check_same_stream",
    "checkpoint_files",
    "expand_batch_sizes",
    "find_resume_checkpoint",
    "plan_differences",
    "save_trainer_state_atomically",
    "validate_ramp_state",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)

RAMP_STATE_KEY = "hf_batchsched.BatchRampTrainer"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_TEMPORARY_SUFFIX = ".tmp"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-<step>"

#: What the batch plan depends on, saved with every checkpoint and compared on resume. ``dataset_size`` and
#: ``seed`` define the data stream itself: a resume with other values is always refused. The others may change on
#: purpose with ``allow_schedule_change_on_resume=True``.
PLAN_KEYS = (
    "dataset_size",
    "seed",
    "batch_schedule",
    "world_size",
    "max_micro_batch_size",
    "batch_size_multiple",
    "rounding",
    "num_train_epochs",
    "max_steps",
    "train_sampling_strategy",
    "dataloader_drop_last",
    "couple",
)
STREAM_KEYS = ("dataset_size", "seed")
#: The keys of the ramp state (``BatchRampMixin.ramp_state_dict``); a state without one of them is damaged.
STATE_KEYS = (
    "clock",
    "consumed_rows",
    "batch_sizes",
    "plan",
    "last_batch_size",
    "last_micro_chunks",
    "save_only_model",
    "coupling",
    "checkpoint_files",
)


class _Incomplete(Exception):
    """What a crash during a save leaves: the checkpoint cannot be used, and an older one may be."""


@dataclass
class ResumePoint:
    """A complete checkpoint to resume from: its folder, its ramp state and the Trainer's ``global_step``."""

    path: str
    ramp_state: dict
    global_step: int

    @property
    def state_file(self) -> str:
        return os.path.join(self.path, TRAINER_STATE_FILE)


# ---- writing -------------------------------------------------------------------------------------------------------
def checkpoint_files(folder: str) -> list[str]:
    """Relative paths of every file under ``folder`` except ``trainer_state.json`` and temporary files, sorted."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), folder)
            if path != TRAINER_STATE_FILE and not name.endswith(_TEMPORARY_SUFFIX):
                files.append(path.replace(os.sep, "/"))
    return sorted(files)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: ``path`` is either the old or the new file."""
    temporary = path + _TEMPORARY_SUFFIX
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    with _suppress_os_error():  # make the rename itself durable where the platform allows it
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, OSError)


def append_batch_size(history: list[list[int]], size: int) -> None:
    """Record one step of global batch ``size`` in a run-length encoded history (``[[size, steps], ...]``)."""
    if history and history[-1][0] == size:
        history[-1][1] += 1
    else:
        history.append([size, 1])


def expand_batch_sizes(history: Sequence[Sequence[int]]) -> list[int]:
    """The global batch size of every step from a run-length encoded history.

    >>> expand_batch_sizes([[4, 2], [8, 1]])
    [4, 4, 8]
    """
    return [size for size, steps in history for _ in range(steps)]


# ---- reading -------------------------------------------------------------------------------------------------------
def _int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_same_stream(saved_plan: Mapping, current: Mapping, source: str) -> None:
    """Refuse a checkpoint saved for another data stream (``STREAM_KEYS`` of the plan fingerprints differ)."""
    for key in STREAM_KEYS:
        if saved_plan[key] != current[key]:
            raise ConfigError(
                f"{source}: the checkpoint was saved for a dataset of {saved_plan['dataset_size']} samples "
                f"and data seed {saved_plan['seed']}, this run has {current['dataset_size']} and "
                f"{current['seed']}; resume with the same train_dataset and seed (the data position means nothing "
                "in another stream)"
            )


def validate_ramp_state(state, source: str) -> None:
    """Raise a ``ConfigError`` naming ``source`` and the bad entry when ``state`` is not a usable ramp state."""

    def damaged(what: str):
        return ConfigError(
            f"{source}: the hf_batchsched state ('stateful_callbacks' -> {RAMP_STATE_KEY!r}) is damaged: {what}; "
            "resume from another checkpoint or start the run again"
        )

    if not isinstance(state, Mapping):
        raise damaged(f"expected a JSON object, found {type(state).__name__}")
    for key in STATE_KEYS:
        if key not in state:
            raise damaged(f"the key {key!r} is missing")
    if not _int(state["consumed_rows"]):
        raise damaged(f"'consumed_rows' is {state['consumed_rows']!r}, expected a count (an integer >= 0)")
    clock = state["clock"]
    if not isinstance(clock, Mapping):
        raise damaged(f"'clock' is {clock!r}, expected an object")
    for key in ("optimizer_steps", "consumed_samples", "consumed_tokens"):
        if key not in clock:
            raise damaged(f"'clock.{key}' is missing")
        if not _int(clock[key]):
            raise damaged(f"'clock.{key}' is {clock[key]!r}, expected a count (an integer >= 0)")
    for key in ("total_steps", "total_samples", "total_tokens"):
        if clock.get(key) is not None and not _int(clock[key]):
            raise damaged(f"'clock.{key}' is {clock[key]!r}, expected an integer or null")
    history = state["batch_sizes"]
    if not isinstance(history, list) or not all(
        isinstance(entry, list) and len(entry) == 2 and _int(entry[0], 1) and _int(entry[1], 1) for entry in history
    ):
        raise damaged("'batch_sizes' must be a list of [global batch size, steps] pairs of positive integers")
    steps, samples = sum(n for _, n in history), sum(size * n for size, n in history)
    if (steps, samples) != (clock["optimizer_steps"], clock["consumed_samples"]):
        raise damaged(
            f"'batch_sizes' adds up to {steps} steps and {samples} samples, but the clock says "
            f"{clock['optimizer_steps']} steps and {clock['consumed_samples']} samples"
        )
    plan = state["plan"]
    if not isinstance(plan, Mapping) or any(key not in plan for key in PLAN_KEYS):
        missing = [key for key in PLAN_KEYS if not isinstance(plan, Mapping) or key not in plan]
        raise damaged(f"'plan' must be an object with the keys {', '.join(PLAN_KEYS)}; missing: {', '.join(missing)}")
    if not isinstance(state["save_only_model"], bool):
        raise damaged(f"'save_only_model' is {state['save_only_model']!r}, expected true or false")
    files = state["checkpoint_files"]
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise damaged("'checkpoint_files' must be a list of file names")
    coupling = state["coupling"]
    if coupling is not None and (
        not isinstance(coupling, Mapping)
        or (coupling.get("base_batch_size") is not None and not _int(coupling["base_batch_size"], 1))
    ):
        raise damaged(f"'coupling' is {coupling!r}, expected null or an object with a positive 'base_batch_size'")
    for key in ("last_batch_size", "last_micro_chunks"):
        if state[key] is not None and not _int(state[key], 1):
            raise damaged(f"'{key}' is {state[key]!r}, expected a positive integer or null")


def _inspect(folder: str) -> ResumePoint:
    """The resume point stored in ``folder``; ``_Incomplete`` for what a crash leaves, ``ConfigError`` otherwise."""
    path = os.path.join(folder, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        raise _Incomplete(f"{TRAINER_STATE_FILE} is missing (the Trainer writes it last)")
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    if not text.strip():
        raise _Incomplete(f"{TRAINER_STATE_FILE} is empty")
    try:
        trainer_state = json.loads(text)
    except json.JSONDecodeError as error:
        raise _Incomplete(
            f"{TRAINER_STATE_FILE} is cut off or not JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(trainer_state, dict):
        raise ConfigError(
            f"{path}: expected a JSON object, found a {type(trainer_state).__name__}; the file is damaged: resume "
            "from another checkpoint or start the run again"
        )
    callbacks = trainer_state.get("stateful_callbacks")
    if not isinstance(callbacks, dict) or RAMP_STATE_KEY not in callbacks:
        raise ConfigError(
            f"{folder} was not saved by a BatchRampTrainer ({path} holds no {RAMP_STATE_KEY!r} state), so the data "
            "position and batch-size clock cannot be restored; resume it with the trainer that saved it, or start "
            "a new run (to start from its weights, load them as the model)"
        )
    ramp_state = callbacks[RAMP_STATE_KEY]
    validate_ramp_state(ramp_state, path)
    global_step = trainer_state.get("global_step")
    if not _int(global_step):
        raise ConfigError(f"{path}: 'global_step' is {global_step!r}, expected a count; the file is damaged")
    missing = [name for name in ramp_state["checkpoint_files"] if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise _Incomplete(f"files listed in {TRAINER_STATE_FILE} are missing: {shown}")
    steps = ramp_state["clock"]["optimizer_steps"]
    if steps != global_step:
        raise ConfigError(
            f"{path}: the batch-size clock is at optimizer step {steps} but the Trainer's global_step is "
            f"{global_step}; the two were not saved together, so the data position is unknown: resume from another "
            "checkpoint or start the run again"
        )
    if ramp_state["save_only_model"]:
        raise ConfigError(
            f"{folder} was saved with save_only_model=True: it has no optimizer, scheduler or RNG state, so training "
            "cannot continue where it stopped; resume from a full checkpoint, or start a new run from its weights"
        )
    return ResumePoint(folder, dict(ramp_state), global_step)


def _checkpoints_newest_first(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def _newest_complete(directory: str, below: int | None = None) -> tuple[ResumePoint | None, list[str]]:
    """The newest complete checkpoint in ``directory`` (below step ``below``), and the incomplete ones passed over."""
    passed_over = []
    for step, folder in _checkpoints_newest_first(directory):
        if below is not None and step >= below:
            continue
        try:
            return _inspect(folder), passed_over
        except _Incomplete as reason:
            passed_over.append(f"{os.path.basename(folder)} ({reason})")
    return None, passed_over


def _newest_complete_hint(directory: str, below: int | None) -> str:
    try:
        point, _ = _newest_complete(directory, below)
    except ConfigError:
        point = None
    if point is None:
        return f"there is no complete checkpoint before it in {directory}: start the run again"
    return f"the newest complete checkpoint before it is {point.path}: resume from it (or pass True)"


def find_resume_checkpoint(resume_from_checkpoint, output_dir: str, *, announce: bool = True) -> ResumePoint | None:
    """Resolve ``train(resume_from_checkpoint=...)`` to a complete checkpoint, or refuse it with a ``ConfigError``.

    Args:
        resume_from_checkpoint (`str`, `os.PathLike`, `bool` or `None`): ``None``/``False``: no resume. ``True``:
            the newest complete checkpoint in ``output_dir``; incomplete newer ones (a crash during their save) are
            passed over, with one log line. A path: that checkpoint, which must exist and be complete.
        output_dir (`str`): the run's ``TrainingArguments.output_dir``.
        announce (`bool`, *optional*, defaults to `True`): log the passed-over checkpoints (``False`` on all but one
            process of a distributed run).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        point, passed_over = _newest_complete(output_dir)
        if point is None:
            if not passed_over:
                raise ConfigError(
                    f"resume_from_checkpoint=True: there is no checkpoint in output_dir {output_dir!r}; start "
                    "without resume_from_checkpoint"
                )
            raise ConfigError(
                f"resume_from_checkpoint=True: no complete checkpoint in {output_dir!r}, only incomplete ones: "
                f"{'; '.join(passed_over)}. A crash during the first save leaves none: start the run again"
            )
        if passed_over and announce:
            logger.warning(
                "Resuming from %s, the newest complete checkpoint; passed over the incomplete %s",
                point.path,
                "; ".join(passed_over),
            )
        return point
    if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
        raise ConfigError(
            f"resume_from_checkpoint must be True, a checkpoint path or None, got {resume_from_checkpoint!r}"
        )
    folder = os.fspath(resume_from_checkpoint)
    if not os.path.exists(folder):
        raise ConfigError(f"resume_from_checkpoint: {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise ConfigError(f"resume_from_checkpoint: {folder!r} is a file, not a checkpoint folder")
    try:
        return _inspect(folder)
    except _Incomplete as reason:
        match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(folder)))
        hint = _newest_complete_hint(os.path.dirname(os.path.normpath(folder)), int(match.group(1)) if match else None)
        raise ConfigError(f"checkpoint {folder} is incomplete: {reason}; {hint}") from None


# ---- comparing plans -----------------------------------------------------------------------------------------------
def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def plan_differences(saved: Mapping, current: Mapping, keys: Sequence[str] = PLAN_KEYS) -> list[str]:
    """``"key: saved -> current"`` for each of ``keys`` whose value differs.

    >>> plan_differences({"seed": 0, "world_size": 1}, {"seed": 0, "world_size": 2}, ["seed", "world_size"])
    ['world_size: 1 -> 2']
    """
    return [
        f"{key}: {_shown(saved.get(key))} -> {_shown(current.get(key))}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def save_trainer_state_atomically(state, json_path: str) -> None:
    """``TrainerState.save_to_json``, written through a temporary file and a rename, listing the checkpoint's files."""
    stored = (state.stateful_callbacks or {}).get(RAMP_STATE_KEY)
    if isinstance(stored, dict):
        stored["checkpoint_files"] = checkpoint_files(os.path.dirname(json_path))
    write_text_atomically(json_path, json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n")
