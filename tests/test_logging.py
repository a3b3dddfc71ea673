"""Metrics reach every report_to integration under DESIGN.md's names: TensorBoard, W&B (offline), MLflow (file store).

One short BatchRampTrainer run (tiny Llama, batch ramp 8 -> 16, sharpness probe) reports to all three at once;
each test reads one backend's files back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="install the dev extra: pip install -e '.[dev]'")
pytest.importorskip("mlflow", reason="install the dev extra: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    import os

    from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
    from hf_batchsched.recipe import build_trainer, parse_config

    root = tmp_path_factory.mktemp("logging")
    names = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_SILENT", "MLFLOW_TRACKING_URI",
             "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")  # fmt: skip
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_PROJECT="hf-batchsched-test", WANDB_SILENT="true",
        MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_EXPERIMENT_NAME="hf-batchsched-test",
        MLFLOW_ALLOW_FILE_STORE="true",  # MLflow 3 keeps the local file store behind this opt-in
    )  # fmt: skip
    try:
        args = parse_config({
            "output_dir": str(root / "out"), "report_to": ["tensorboard", "wandb", "mlflow"], "use_cpu": True,
            "per_device_train_batch_size": 8, "num_train_epochs": 1, "logging_steps": 1, "save_strategy": "no",
            "disable_tqdm": True, "learning_rate": 1e-3,
            "batch_schedule": {"name": "piecewise", "schedule": "0:8 32:16"},
            "sharpness": {"every_n_steps": 2, "num_probe_samples": 8},
        })  # fmt: skip
        trainer = build_trainer(args, tiny_llama(), _Pad(), synthetic_lm_dataset(64), None)
        trainer.train()
        import wandb

        wandb.finish()  # the Trainer leaves the run open until exit; finishing writes files/wandb-summary.json
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root, trainer


class _Pad:  # what pad_collator needs from a tokenizer
    pad_token_id = 0


EXPECTED = ("batchsched/batch_size", "batchsched/samples_seen", "batchsched/tokens_seen", "sharpness/avg")


def test_tensorboard_event_file_holds_the_metrics(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, trainer = logged_run
    (event_file,) = (root / "out" / "runs").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert "train/loss" in tags
    for name in EXPECTED:  # the Trainer's TensorBoard callback prefixes "train/"
        assert f"train/{name}" in tags
    sizes = [event.value for event in accumulator.Scalars("train/batchsched/batch_size")]
    assert sizes[0] == 8 and sizes[-1] == 16, "the ramp is visible in TensorBoard"
    logged = [e["batchsched/batch_size"] for e in trainer.state.log_history if "batchsched/batch_size" in e]
    assert sizes == logged, "every logged value reached TensorBoard"


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline ``run-*.wandb`` file.

    The file is wandb's transaction log: a 7-byte file header, then LevelDB-log framing (32 KiB blocks; each record
    chunk has a 7-byte header: CRC32 (4), length (2, little endian), type (1: full, 2: first, 3: middle, 4: last))
    around ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 no longer ships a Python reader for it.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, rows = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (kind == 0 and length == 0):  # block trailer / padding
            position += room
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(logged_run):
    root, trainer = logged_run
    (run_file,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    keys = set().union(*rows)
    assert "train/loss" in keys
    for name in EXPECTED:  # WandbCallback prefixes "train/"
        assert f"train/{name}" in keys
    sizes = [row["train/batchsched/batch_size"] for row in rows if "train/batchsched/batch_size" in row]
    assert sizes == [e["batchsched/batch_size"] for e in trainer.state.log_history if "batchsched/batch_size" in e]
    assert sizes[0] == 8 and sizes[-1] == 16


def test_mlflow_file_store_holds_the_metrics(logged_run):
    import mlflow

    root, _ = logged_run
    client = mlflow.tracking.MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "hf-batchsched-test"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert "loss" in run.data.metrics
    for name in EXPECTED:
        assert name in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "batchsched/batch_size")
    assert [m.value for m in history][0] == 8 and history[-1].value == 16
