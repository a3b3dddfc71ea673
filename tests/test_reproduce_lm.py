"""The language-model reproductions in quick mode: output structure and sanity (not the papers' numbers)."""

import json
import math

from hf_batchsched.bench import lm_task, reproduce_seesaw
from hf_batchsched.cli import main


def test_cbs_warmup_schedule_steps_up_to_measured_b_crit():
    config = lm_task.LMConfig(base_batch_size=8, max_batch_size=32)
    rows = [
        {"samples": 0, "b_crit": 8},
        {"samples": 100, "b_crit": 24},
        {"samples": 200, "b_crit": 16},
        {"samples": 300, "b_crit": 512},
    ]
    schedule = reproduce_seesaw.cbs_warmup_schedule(rows, config)
    # 24 -> 16 (largest 8 * 2**k below it); a lower later B_crit never shrinks the batch; the cap is 32.
    assert schedule.thresholds == (0, 100, 300) and schedule.sizes == (8, 16, 32)


def test_reproduce_seesaw_quick(tmp_path, capsys):
    assert main(["reproduce", "seesaw", "--quick", "--output-dir", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "seesaw vs constant" in out and "range test" in out
    result = json.loads((tmp_path / "seesaw.json").read_text())
    config = lm_task.LMConfig.quick()
    assert set(result["tasks"]) == {"pretrain", "lora"}
    for task, measured in result["tasks"].items():
        arms = measured["arms"]
        assert set(arms) == set(reproduce_seesaw.ARMS)
        start = measured["critical_batch"][0]["loss_start"]  # the untrained (pretrain) / base (lora) model
        for arm, cell in arms.items():
            assert cell["tokens"] == config.total_samples * config.seq_length, (task, arm)  # equal tokens
            assert len(cell["eval_losses"]) == len(config.seeds)
            assert all(math.isfinite(x) and x < start for x in cell["eval_losses"]), (task, arm)  # it learned
            assert max(cell["batch_sizes"]) <= config.max_batch_size
        assert arms["constant"]["optimizer_steps"] == config.total_samples // config.base_batch_size
        assert arms["constant"]["batch_sizes"] == [config.base_batch_size]
        assert arms["seesaw"]["optimizer_steps"] < arms["constant"]["optimizer_steps"]
        assert arms["seesaw"]["optimizer_steps"] == arms["seesaw_coupled"]["optimizer_steps"]
        sizes = arms["cbs_warmup"]["schedule"]["sizes"]
        # from B0 * 2**k up to the first measured B_crit, never decreasing
        assert sizes == sorted(sizes) and all(s % config.base_batch_size == 0 for s in sizes)
        assert sizes[0] <= max(config.base_batch_size, measured["critical_batch"][0]["b_crit"])
        assert measured["best_lr"] in config.lrs and measured["range_test"]["suggestion"] > 0
        for row in measured["critical_batch"]:
            assert row["b_crit"] in config.cbs_batch_sizes and len(row["losses"]) == len(config.cbs_batch_sizes)
        reduction = measured["summary"]["seesaw"]["step_reduction_vs_constant"]
        assert math.isclose(reduction, 1 - arms["seesaw"]["optimizer_steps"] / arms["constant"]["optimizer_steps"])


def test_reproduce_critical_batch_quick_one_task(tmp_path, capsys):
    assert main(["reproduce", "critical-batch", "--quick", "--task", "lora", "--output-dir", str(tmp_path)]) == 0
    assert "B_crit" in capsys.readouterr().out
    result = json.loads((tmp_path / "critical_batch-lora.json").read_text())
    assert (tmp_path / "critical_batch-lora.png").stat().st_size > 0
    rows = result["tasks"]["lora"]["critical_batch"]
    assert [r["fraction"] for r in rows] == sorted(lm_task.LMConfig.quick().cbs_fractions)
    assert rows[0]["samples"] == 0 and rows[-1]["samples"] > 0
    assert rows[-1]["loss_start"] < rows[0]["loss_start"]  # the reference run trained between the checkpoints
    assert rows[0]["losses"][0] < rows[0]["loss_start"]  # branches from the base model at the peak LR learn
