"""What the sharpness probe's gradient-based metrics cost, measured side by side in one run.

Run: ``.venv/bin/python benchmarks/bench_probe_costs.py [--quick]``; writes ``benchmarks/results/probe_costs.json``.

1. **Exact HVP** against a PyHessian-style reference HVP on the same model and probe batch: the reference builds
   ``gradsH = grad(loss, params, create_graph=True)`` once and then runs ``grad(gradsH, params, v,
   retain_graph=True)`` per HVP (PyHessian's single-batch mode, written here from its description). Ours with the
   default graph reuse, and with ``reuse_graph=False`` (the previous behaviour: forward and first-order graph
   rebuilt at every HVP). Thread CPU time, the three interleaved, median of the per-repeat ratios. Also graph
   builds and forwards per 20-step Lanczos run.
2. **Finite-difference lambda_max** against the exact value, for the previous fixed step ``u^(1/3)``, the default
   ``u^(1/3) * rms(w)``, and a norm-scaled ``u^(1/3) * ||w||``, on full tiny Llamas at init and fitted to low
   loss, and on a LoRA adapter.
3. **Keskar** (``p = 100``, 10 L-BFGS-B iterations) on a 0.53M-parameter full tiny Llama: time in forward+backward
   equivalents and peak memory of one call, for the code before these changes (extracted from git at
   ``--before``) and for the current code on its first call (subspace drawn) and its second (subspace kept); and
   the parameter copies each probe makes. Each call runs in a fresh process with a fixed glibc mmap threshold, so
   RSS tracks live memory (see ``bench_trainer.py``); the peak is sampled every 2 ms.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "probe_costs.json"
BEFORE = "3ac581e"  # main before the probe-cost changes
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
SMALL = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128}
LARGE = {"hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 256}


def lora_model(seed: int = 0, **config):
    from peft import LoraConfig, get_peft_model

    from hf_batchsched.assets import tiny_llama

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(
            tiny_llama(seed=seed, **config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a trained-looking adapter (B = 0 makes the Hessian degenerate)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def probe_batches(num_batches: int, batch_size: int, seq_len: int = 32):
    from hf_batchsched.assets import synthetic_lm_dataset

    ds = synthetic_lm_dataset(num_samples=num_batches * batch_size, seq_len=seq_len)
    return [
        {k: torch.tensor(ds[i : i + batch_size][k]) for k in ds.column_names}
        for i in range(0, num_batches * batch_size, batch_size)
    ]


def fit(model, batches, steps: int, lr: float):
    """Adam on the probe set itself: a low-loss point whose curvature varies fast (where FD steps matter)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        (sum(model(**batch).loss for batch in batches) / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def cpu_seconds(function) -> float:
    start = time.thread_time()
    function()
    return time.thread_time() - start


def forward_backward_seconds(model, batches, repeats: int = 5) -> float:
    def run():
        for batch in batches:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    run()
    return statistics.median(cpu_seconds(run) for _ in range(repeats))


# --------------------------------------------------------------------------------------------------------------
# 1. exact HVP vs a PyHessian-style reference
# --------------------------------------------------------------------------------------------------------------


def hvp_costs(model, batch, repeats: int) -> dict:
    from hf_batchsched.probes.hvp import ProbeObjective
    from hf_batchsched.probes.lanczos import lanczos
    from hf_batchsched.probes.preserve import preserved_model_state

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    unit = forward_backward_seconds(model, [batch])
    vector = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    flat = torch.cat([v.reshape(-1) for v in vector])
    with preserved_model_state(model) as preserved:
        # PyHessian-style: the first-order graph once, then one backward through it per HVP
        loss = model(**batch).loss
        grads_h = torch.autograd.grad(loss, params, create_graph=True)

        def reference():
            return torch.autograd.grad(grads_h, params, grad_outputs=vector, retain_graph=True)

        kept = ProbeObjective(model, [batch], hvp_method="exact", preserved=preserved)
        rebuilt = ProbeObjective(model, [batch], hvp_method="exact", reuse_graph=False, preserved=preserved)
        ours_out = kept.hvp(flat)  # builds the kept graph (not timed: once per probe)
        ref_out = torch.cat([t.reshape(-1) for t in reference()])
        agreement = float((ours_out - ref_out).norm() / ref_out.norm())
        times = {"reference": [], "ours": [], "rebuild": []}
        for _ in range(repeats):
            times["reference"].append(cpu_seconds(reference))
            times["ours"].append(cpu_seconds(lambda: kept.hvp(flat)))
            times["rebuild"].append(cpu_seconds(lambda: rebuilt.hvp(flat)))
        graph_bytes = kept.graph_bytes.get(0)
        kept.close()
        rebuilt.close()
        grads_h = loss = None  # free the reference graph
        counts = {}
        for reuse in (None, False):  # a 20-step Lanczos run over the default-shaped probe set (2 batches)
            two = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
            objective = ProbeObjective(model, two, hvp_method="exact", reuse_graph=reuse, preserved=preserved)
            lanczos(objective.hvp, objective.numel, 20, 0.0, like=torch.zeros(1))
            counts["reuse" if reuse is None else "rebuild"] = {
                "hvps": objective.num_hvps,
                "forwards": objective.num_forwards,
                "graph_builds": objective.num_graph_builds,
            }
            objective.close()
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return {
        "trainable_params": sum(p.numel() for p in params),
        "forward_backward_s": unit,
        "reference_hvp_s": statistics.median(times["reference"]),
        "ours_hvp_s": statistics.median(times["ours"]),
        "rebuild_hvp_s": statistics.median(times["rebuild"]),
        "ours_over_reference": ratio("ours", "reference"),
        "rebuild_over_reference": ratio("rebuild", "reference"),
        "reference_fwd_bwd_equivalents": statistics.median(times["reference"]) / unit,
        "ours_fwd_bwd_equivalents": statistics.median(times["ours"]) / unit,
        "rebuild_fwd_bwd_equivalents": statistics.median(times["rebuild"]) / unit,
        "relative_difference_ours_vs_reference": agreement,
        "kept_graph_bytes": graph_bytes,
        "lanczos_20_steps_2_batches": counts,
        "repeats": repeats,
    }


# --------------------------------------------------------------------------------------------------------------
# 2. finite-difference step
# --------------------------------------------------------------------------------------------------------------


def fd_accuracy(name: str, model, batches, steps: int) -> dict:
    from hf_batchsched.probes.sharpness import lambda_max

    options = {"max_steps": steps, "tol": 1e-10}
    eps = torch.finfo(torch.float32).eps
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters() if p.requires_grad])
    exact = lambda_max(model, batches, hvp_method="exact", **options)["lambda_max"]
    default = lambda_max(model, batches, hvp_method="fd", **options)["lambda_max"]
    chosen = {
        "previous u^(1/3)": eps ** (1 / 3),
        "u^(1/3) * ||w||": eps ** (1 / 3) * float(theta.norm()),
    }
    row = {
        "trainable_params": theta.numel(),
        "w_rms": float(theta.norm()) / theta.numel() ** 0.5,
        "w_norm": float(theta.norm()),
        "exact_lambda_max": exact,
        "relative_error": {"default u^(1/3) * rms(w)": default / exact - 1},
        "steps": {"default u^(1/3) * rms(w)": eps ** (1 / 3) * float(theta.norm()) / theta.numel() ** 0.5},
    }
    for label, step in chosen.items():
        value = lambda_max(model, batches, hvp_method="fd", fd_step=step, **options)["lambda_max"]
        row["relative_error"][label] = value / exact - 1
        row["steps"][label] = step
    # the same weights in bf16, default step, against the fp32 exact value
    bf16 = lambda_max(copy.deepcopy(model).to(torch.bfloat16), batches, hvp_method="fd", **options)["lambda_max"]
    row["bf16_default_relative_error"] = bf16 / exact - 1
    print(
        f"  {name}: exact lambda_max {exact:.4g}; FD relative error "
        + ", ".join(
            f"{label} (h={row['steps'][label]:.2g}) {err:+.2e}" for label, err in row["relative_error"].items()
        )
        + f"; bf16 weights, default step {row['bf16_default_relative_error']:+.2e}",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------------------------------------------
# 3. Keskar and parameter copies, one process per measurement
# --------------------------------------------------------------------------------------------------------------


def child(args) -> None:
    """Measure one Keskar call (or two) in this fresh process and print a json line."""
    if args.package:
        sys.path.insert(0, args.package)
    from hf_batchsched.assets import tiny_llama
    from hf_batchsched.probes.sharpness import keskar_sharpness, lambda_max

    torch.set_num_threads(1)
    model = tiny_llama(seed=0, **LARGE).eval()
    batches = probe_batches(2, 8)
    unit = forward_backward_seconds(model, batches)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * page

    def measured(function):
        base, samples, done = rss(), [], threading.Event()

        def poll():
            while not done.is_set():
                samples.append(rss())
                time.sleep(0.002)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        start = time.thread_time()
        out = function()
        seconds = time.thread_time() - start
        done.set()
        thread.join()
        return out, seconds, max(samples + [rss()]) - base, rss() - base

    calls = []
    for _ in range(args.calls):
        out, seconds, peak, held = measured(lambda: keskar_sharpness(model, batches))
        calls.append(
            {
                "fwd_bwd_equivalents": seconds / unit,
                "seconds": seconds,
                "peak_mib": peak / 2**20,
                "held_after_mib": held / 2**20,
                "keskar_evals": out["keskar_evals"],
                "keskar": out["keskar"],
            }
        )
    # parameter copies of one probe: clones of tensors shaped like a trainable parameter
    shapes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    copies = []
    original = torch.Tensor.clone

    def counting(tensor, *a, **k):
        if tuple(tensor.shape) in shapes:
            copies.append(tensor.numel() * tensor.element_size())
        return original(tensor, *a, **k)

    torch.Tensor.clone = counting
    try:
        lambda_max(model, batches, max_steps=1)
    finally:
        torch.Tensor.clone = original
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(
        json.dumps(
            {
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "forward_backward_s": unit,
                "calls": calls,
                "parameter_copy_bytes_per_probe": sum(copies),
                "parameter_copies_per_probe": sum(copies) / trainable,
            }
        )
    )


def extract_before(revision: str, directory: str) -> str:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "hf_batchsched"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"cannot extract {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    return directory


def keskar_costs(before: str, repeats: int) -> dict:
    runs = {"before": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        package = extract_before(before, tmp)
        for _ in range(repeats):  # interleaved: before, current, before, current, ...
            for label, extra in (("before", ["--package", package, "--calls", "1"]), ("current", ["--calls", "2"])):
                command = [sys.executable, __file__, "--child", *extra]
                done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT)
                if done.returncode:
                    raise SystemExit(done.stderr)
                runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(label: str, call: int, key: str) -> float:
        return statistics.median(run["calls"][call][key] for run in runs[label])

    out = {"before_revision": before, "repeats": repeats, "runs": runs}
    for key in ("fwd_bwd_equivalents", "peak_mib", "held_after_mib", "keskar_evals"):
        out[key] = {
            "before": median("before", 0, key),
            "current_first_call": median("current", 0, key),
            "current_later_calls": median("current", 1, key),
        }
    out["parameter_copies_per_probe"] = {
        label: statistics.median(run["parameter_copies_per_probe"] for run in runs[label]) for label in runs
    }
    before_value, current_value = (runs[label][0]["calls"][0]["keskar"] for label in ("before", "current"))
    out["keskar_relative_difference_current_vs_before"] = abs(current_value / before_value - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--before", default=BEFORE, help="git revision of the code to compare Keskar against")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--package", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from hf_batchsched.assets import tiny_llama

    torch.set_num_threads(1)
    repeats = 5 if args.quick else 15
    results = {"device": "cpu", "torch": torch.__version__, "platform": platform.platform(), "threads": 1}

    print("1. exact HVP vs PyHessian-style reference (one probe batch of 16 x 32 tokens)", flush=True)
    batch = probe_batches(1, 16)[0]
    results["hvp"] = {}
    for name, model in (
        ("lora_h64", lora_model(**SMALL)),
        ("full_h64", tiny_llama(seed=0, **SMALL)),
        ("full_h128", tiny_llama(seed=0, **LARGE)),
    ):
        row = results["hvp"][name] = hvp_costs(model, batch, repeats)
        builds = row["lanczos_20_steps_2_batches"]
        print(
            f"  {name} ({row['trainable_params']} params): per HVP, ours / reference = "
            f"{row['ours_over_reference']:.3f} (rebuilding every HVP: {row['rebuild_over_reference']:.3f}); "
            f"fwd+bwd equivalents: reference {row['reference_fwd_bwd_equivalents']:.2f}, ours "
            f"{row['ours_fwd_bwd_equivalents']:.2f}, rebuilding {row['rebuild_fwd_bwd_equivalents']:.2f}; kept graph "
            f"{row['kept_graph_bytes'] / 2**20:.1f} MiB; graph builds per 20-step Lanczos run over 2 batches: "
            f"{builds['reuse']['graph_builds']} (rebuilding: {builds['rebuild']['graph_builds']})",
            flush=True,
        )

    print("2. finite-difference lambda_max vs exact (fp32, 2 probe batches of 8 x 32 tokens)", flush=True)
    batches = probe_batches(2, 8)
    fd_steps = 20 if args.quick else 30
    results["fd"] = {
        "full_h64_init": fd_accuracy("full h64 at init", tiny_llama(seed=0, **SMALL), batches, fd_steps),
        "full_h64_fitted": fd_accuracy(
            "full h64 fitted", fit(tiny_llama(seed=0, **SMALL), batches, 300, 3e-3), batches, fd_steps
        ),
        "full_h128_fitted": fd_accuracy(
            "full h128 fitted", fit(tiny_llama(seed=0, **LARGE), batches, 300, 3e-3), batches, fd_steps
        ),
        "lora_h64_fitted": fd_accuracy(
            "LoRA h64 fitted", fit(lora_model(**SMALL), batches, 200, 1e-2), batches, fd_steps
        ),
    }

    print(f"3. Keskar (p=100, maxiter=10) on a full h128 tiny Llama, before ({args.before}) vs current", flush=True)
    results["keskar"] = keskar = keskar_costs(args.before, 1 if args.quick else 3)
    for key in ("fwd_bwd_equivalents", "peak_mib", "held_after_mib", "keskar_evals"):
        row = keskar[key]
        print(
            f"  {key}: before {row['before']:.1f}, current first call {row['current_first_call']:.1f}, "
            f"later calls {row['current_later_calls']:.1f}"
        )
    difference = keskar["keskar_relative_difference_current_vs_before"]
    print(f"  parameter copies per probe: {keskar['parameter_copies_per_probe']}; value vs before: {difference:.1e}")

    fd_errors = [row["relative_error"] for row in results["fd"].values()]
    results["summary"] = {
        "hvp_ours_over_pyhessian_style_lora": results["hvp"]["lora_h64"]["ours_over_reference"],
        "hvp_ours_over_pyhessian_style_full": results["hvp"]["full_h64"]["ours_over_reference"],
        "hvp_ours_over_pyhessian_style_max": max(row["ours_over_reference"] for row in results["hvp"].values()),
        "fd_lambda_max_max_abs_error_default": max(abs(e["default u^(1/3) * rms(w)"]) for e in fd_errors),
        "fd_lambda_max_max_abs_error_previous": max(abs(e["previous u^(1/3)"]) for e in fd_errors),
        "keskar_cost_later_calls_over_before": keskar["fwd_bwd_equivalents"]["current_later_calls"]
        / keskar["fwd_bwd_equivalents"]["before"],
        "keskar_cost_first_call_over_before": keskar["fwd_bwd_equivalents"]["current_first_call"]
        / keskar["fwd_bwd_equivalents"]["before"],
        "keskar_peak_memory_first_call_over_before": keskar["peak_mib"]["current_first_call"]
        / keskar["peak_mib"]["before"],
    }
    for key, value in results["summary"].items():
        print(f"  {key}: {value:.3g}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
