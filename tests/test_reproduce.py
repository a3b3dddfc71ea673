"""Tests of the reproductions, ``bench.overheads`` and ``hf-batchsched reproduce`` on tiny (``--quick``) settings.

Nothing here checks a paper's result (those are the full runs in benchmarks/results/reproduce/); the tests check
the machinery: files and keys written, optimizer updates equal to the schedule arithmetic, the parametric line
through the two solutions, the Bjorck summary and the overhead table read from the JSON files, CLI errors.
"""

import dataclasses
import json
import pathlib

import pytest
import torch

from hf_batchsched import cli
from hf_batchsched.bench import overheads
from hf_batchsched.bench import reproduce_smith as smith_module
from hf_batchsched.bench.overheads import OVERHEAD_SOURCES, gather_overheads
from hf_batchsched.bench.reproduce_bjorck import reproduce_bjorck
from hf_batchsched.bench.reproduce_keskar import KESKAR_METRICS, KeskarConfig, line_losses, reproduce_keskar
from hf_batchsched.bench.reproduce_smith import SMITH_RUNS, SmithConfig, reproduce_smith, smith_schedules
from hf_batchsched.bench.task import MLPClassifier, make_teacher_task, mean_loss, train_classifier
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.simulate import simulate

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout (benchmarks/results/ is read from it)

# Two seeds, so the seed aggregation is exercised; 480 samples, 5 epochs, B0 = 8, B_max = N/10 = 48.
SMITH_TINY = dataclasses.replace(SmithConfig.quick(), seeds=(0, 1))


@pytest.fixture(scope="module")
def smith(tmp_path_factory):
    out = tmp_path_factory.mktemp("smith")
    return out, reproduce_smith(out, SMITH_TINY, plot=True)


@pytest.fixture(scope="module")
def keskar(tmp_path_factory):
    out = tmp_path_factory.mktemp("keskar")
    return out, reproduce_keskar(out, KeskarConfig.quick(), plot=True)


# --------------------------------------------------------------------------------------------------
# smith
# --------------------------------------------------------------------------------------------------


def test_smith_writes_json_and_png_with_documented_keys(smith):
    out, result = smith
    on_disk = json.loads((out / "smith.json").read_text())
    assert (out / "smith.png").stat().st_size > 0
    assert {"experiment", "paper", "config", "task", "target", "runs", "summary"} <= set(on_disk)
    assert set(on_disk["runs"]) == set(SMITH_RUNS)
    for run in on_disk["runs"].values():
        assert {
            "optimizer_steps",
            "expected_optimizer_steps",
            "eval_loss",
            "eval_loss_std",
            "eval_loss_per_seed",
            "train_loss",
            "history",
            "per_seed",
            "lr_at_milestones",
            "batch_at_milestones",
        } <= set(run)
        assert len(run["per_seed"]) == len(run["eval_loss_per_seed"]) == 2
    assert {"eval_loss_rel_diff_increasing_vs_decay", "update_ratio_decay_over_increasing", "target_met"} <= set(
        on_disk["summary"]
    )
    assert on_disk["config"]["seeds"] == [0, 1]


def test_smith_update_counts_are_the_schedule_arithmetic(smith):
    _, result = smith
    cfg = SMITH_TINY
    runs = result["runs"]
    # (a): constant B0 over epochs * N samples.
    assert runs["decaying_lr"]["optimizer_steps"] == cfg.epochs * cfg.num_train // cfg.base_batch_size == 300
    # (b): T = 2400 samples, milestones at 720, 1440, 1920; B = 8, 40, then 200 capped at N/10 = 48 (twice):
    # 720/8 + 720/40 + 480/48 + 480/48.
    assert runs["increasing_batch"]["optimizer_steps"] == 90 + 18 + 10 + 10
    # (c): the hybrid caps at factor * B0 = 40: 720/8 + 720/40 + 480/40 + 480/40.
    assert runs["hybrid"]["optimizer_steps"] == 90 + 18 + 12 + 12
    schedules = smith_schedules(cfg)
    for name in SMITH_RUNS:
        expected = simulate(schedules[name][0], cfg.total_samples, multiple=cfg.base_batch_size).num_steps
        assert runs[name]["optimizer_steps"] == runs[name]["expected_optimizer_steps"] == expected
        assert runs[name]["optimizer_steps_per_seed"] == [expected, expected]  # the seed changes no update count
        assert runs[name]["samples"] == cfg.total_samples  # same epochs for all three
    # (b) keeps the LR until the cap (hit at the 2nd milestone: 200 > 48), then LR = original LR * B / B0.
    lrs = runs["increasing_batch"]["lr_at_milestones"]
    lr0 = cfg.learning_rate
    # (1e-12: the residual LR is lr(t) * (B(t) / B0), a product of floats, not the literal LR.)
    assert lrs == pytest.approx([lr0, lr0, lr0 / 25 * 48 / 8, lr0 / 125 * 48 / 8], rel=1e-12)
    assert runs["increasing_batch"]["batch_at_milestones"] == [8, 40, 48, 48]


def test_smith_summary_is_computed_from_the_runs(smith):
    _, result = smith
    runs, summary = result["runs"], result["summary"]
    a, b = runs["decaying_lr"], runs["increasing_batch"]
    for run in runs.values():
        assert run["eval_loss"] == pytest.approx(sum(run["eval_loss_per_seed"]) / 2)
        assert run["eval_loss_per_seed"] == [r["eval_loss"] for r in run["per_seed"]]
    rel = (b["eval_loss"] - a["eval_loss"]) / a["eval_loss"]
    assert summary["eval_loss_rel_diff_increasing_vs_decay"] == pytest.approx(rel)
    assert summary["update_ratio_decay_over_increasing"] == pytest.approx(a["optimizer_steps"] / b["optimizer_steps"])
    assert summary["target_met"] == (rel <= 0.02 and summary["update_ratio_decay_over_increasing"] >= 2.5)


def test_smith_rejects_empty_seeds(tmp_path):
    with pytest.raises(ConfigError, match="seeds"):
        reproduce_smith(tmp_path, dataclasses.replace(SmithConfig.quick(), seeds=()), plot=False)


# --------------------------------------------------------------------------------------------------
# keskar
# --------------------------------------------------------------------------------------------------


def test_keskar_writes_json_and_png_with_documented_keys(keskar):
    out, _ = keskar
    on_disk = json.loads((out / "keskar.json").read_text())
    assert (out / "keskar_parametric.png").stat().st_size > 0
    assert {"experiment", "config", "task", "runs", "parametric_plot", "summary"} <= set(on_disk)
    for name in ("small_batch", "large_batch"):
        run = on_disk["runs"][name]
        assert set(KESKAR_METRICS) <= set(run["sharpness"])
        assert {"generalization_gap_loss", "generalization_gap_accuracy", "train_loss", "eval_loss"} <= set(run)
        assert run["generalization_gap_loss"] == pytest.approx(run["eval_loss"] - run["train_loss"])
    assert on_disk["runs"]["large_batch"]["batch_size"] == round(0.1 * KeskarConfig.quick().num_train)
    line = on_disk["parametric_plot"]
    assert line["alpha"][0] == -1.0 and line["alpha"][-1] == 2.0
    assert {"train_loss", "eval_loss", "train_accuracy", "eval_accuracy"} <= set(line)
    assert all(len(line[key]) == len(line["alpha"]) for key in line)
    assert isinstance(on_disk["summary"]["paper_direction_holds"], bool)
    assert on_disk["summary"]["verdict"].startswith("paper direction")


def test_keskar_parametric_line_hits_the_two_solutions(keskar):
    _, result = keskar
    line = result["parametric_plot"]
    sb = result["runs"]["small_batch"]["per_seed"][0]
    lb = result["runs"]["large_batch"]["per_seed"][0]
    at_sb, at_lb = line["alpha"].index(0.0), line["alpha"].index(1.0)
    # Same weights (alpha in {0, 1} reproduces a solution exactly), same batches, float64 sums: equal bits.
    assert line["train_loss"][at_sb] == sb["train_loss"] and line["eval_loss"][at_sb] == sb["eval_loss"]
    assert line["train_loss"][at_lb] == lb["train_loss"] and line["eval_loss"][at_lb] == lb["eval_loss"]


def test_line_losses_restores_the_model_and_interpolates():
    task = make_teacher_task(64, 64, dim=8, seed=3)
    sb, lb, probe = (MLPClassifier(8, 10, hidden=16, seed=s) for s in (1, 2, 3))
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    batches = {"train": task.batches("train", 32)}
    line = line_losses(probe, sb.state_dict(), lb.state_dict(), [0.0, 0.5, 1.0], batches)
    assert all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
    assert line["train_loss"][0] == mean_loss(sb, batches["train"])[0]
    assert line["train_loss"][2] == mean_loss(lb, batches["train"])[0]
    mid = MLPClassifier(8, 10, hidden=16)
    mid.load_state_dict({k: 0.5 * lb.state_dict()[k] + 0.5 * v for k, v in sb.state_dict().items()})
    assert line["train_loss"][1] == pytest.approx(mean_loss(mid, batches["train"])[0], rel=1e-6)


def test_stop_at_train_loss_stops_early_and_needs_eval_every():
    task = make_teacher_task(128, 64, dim=8, seed=0)
    model = MLPClassifier(8, 10, hidden=16)
    # Any finite loss is <= 1e9, so the run stops at the first epoch mark.
    run = train_classifier(
        model,
        task,
        batch_schedule=32,
        epochs=5,
        learning_rate=1e-3,
        optimizer="adam",
        max_micro_batch_size=32,
        stop_at_train_loss=1e9,
    )
    assert run["optimizer_steps"] == 4 and run["epochs"] == 1.0
    assert run["history"][-1]["train_loss"] <= 1e9
    with pytest.raises(ConfigError, match="eval_every"):
        train_classifier(
            model, task, batch_schedule=32, epochs=1, learning_rate=1e-3, eval_every=None, stop_at_train_loss=0.1
        )


# --------------------------------------------------------------------------------------------------
# bjorck and overheads
# --------------------------------------------------------------------------------------------------


def test_bjorck_summary_of_the_committed_benchmark(tmp_path):
    result = reproduce_bjorck(tmp_path, rerun=False)
    written = json.loads((tmp_path / "bjorck_summary.json").read_text())
    assert written["summary"] == json.loads(json.dumps(result["summary"]))
    rows = json.loads((REPO_ROOT / "benchmarks" / "results" / "bjorck.json").read_text())["results"]
    for label, bn in (("no_bn", False), ("bn", True)):
        trained = [r["lr"] for r in rows if r["batchnorm"] == bn and r["status"] == "trained"]
        assert result["summary"][label]["trained_lrs"] == trained
        assert result["summary"][label]["trainable_range"] == ([min(trained), max(trained)] if trained else None)
    assert len(result["summary"]["diverging_runs"]) == sum(r["diverged"] for r in rows)


def test_bjorck_quick_rerun_through_the_cli(tmp_path, capsys):
    assert cli.main(["reproduce", "bjorck", "--quick", "--no-plots", "--output-dir", str(tmp_path)]) == 0
    assert "trainable LR range" in capsys.readouterr().out
    bench = json.loads((tmp_path / "bjorck.json").read_text())
    assert bench["setup"]["depth"] == 4 and bench["setup"]["steps"] == 20
    summary = json.loads((tmp_path / "bjorck_summary.json").read_text())
    assert summary["command"] == "python benchmarks/bench_bjorck.py --steps 20 --depth 4"


def test_overheads_table_reads_the_results_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "trainer.json").write_text(
        json.dumps({"cpu_throughput_ratio_ramp_over_plain": 0.97, "memory_ratio_ramp8to256_over_const8": 1.5})
    )
    (results / "stability.json").write_text(json.dumps({"llama": {"overhead_percent_accounted": 12.5}}))
    out = gather_overheads(tmp_path / "out", results_dir=results)
    rows = {row["source"]: row for row in out["rows"]}
    assert rows["trainer.json:cpu_throughput_ratio_ramp_over_plain"]["value"] == 0.97
    assert rows["trainer.json:memory_ratio_ramp8to256_over_const8"]["value"] == 1.5
    assert rows["stability.json:llama.overhead_percent_accounted"]["value"] == 12.5
    assert rows["trainer.json:throughput_ratio_ramp_over_plain"]["value"] is None  # missing key: null, not invented
    assert rows["sharpness.json:callback_overhead.overhead_pct_measured_probe_time"]["value"] is None
    assert any("sharpness.json not found" in note for note in out["notes"])
    assert "| 12.5% |" in (tmp_path / "out" / "overheads.md").read_text()
    assert all(row["command"].startswith("python benchmarks/bench_") for row in out["rows"])


def test_overheads_of_the_repository_match_its_json_files(tmp_path):
    out = gather_overheads(tmp_path)
    results = REPO_ROOT / "benchmarks" / "results"
    assert len(out["rows"]) == sum(len(metrics) for _, metrics, _ in OVERHEAD_SOURCES.values())
    for row in out["rows"]:
        filename, key = row["source"].split(":")
        path = results / filename
        expected = overheads.lookup(json.loads(path.read_text()), key) if path.is_file() else None
        assert row["value"] == expected


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_bad_experiment_is_one_line_exit_2(capsys):
    assert cli.main(["reproduce", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nonsense" in err and "smith" in err


def test_cli_smith_quick_prints_headline(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_smith(output_dir, config, plot):
        calls["config"] = config
        return {
            "runs": {name: {"eval_loss": 1.0, "eval_loss_std": 0.0, "optimizer_steps": 10} for name in SMITH_RUNS},
            "summary": {
                "eval_loss_rel_diff_increasing_vs_decay": 0.0,
                "update_ratio_decay_over_increasing": 3.0,
                "target_met": True,
            },
        }

    monkeypatch.setattr(smith_module, "reproduce_smith", fake_smith)
    assert cli.main(["reproduce", "smith", "--quick", "--seed", "5", "--output-dir", str(tmp_path)]) == 0
    assert calls["config"].seeds == (5,) and calls["config"].num_train == SmithConfig.quick().num_train
    assert "target met: True" in capsys.readouterr().out
