"""The package's public API: every ``__all__`` name resolves, the README imports work, ``import hf_batchsched`` is
light, and each implementation has one home."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys

import pytest

import hf_batchsched

# The package root and the packages/modules of the core (callbacks/ and probes/ are checked through the root names).
PUBLIC_MODULES = [
    "hf_batchsched",
    "hf_batchsched.schedules",
    "hf_batchsched.data",
    "hf_batchsched.bench",
    "hf_batchsched.trainer",
    "hf_batchsched.checkpoint",
    "hf_batchsched.schedules.batch",
    "hf_batchsched.schedules.batch_base",
    "hf_batchsched.schedules.batch_config",
    "hf_batchsched.schedules.simulate",
    "hf_batchsched.schedules.lr",
    "hf_batchsched.schedules.lr_config",
    "hf_batchsched.schedules.adaptive",
    "hf_batchsched.schedules.smith",
    "hf_batchsched.schedules.seesaw_pair",
    "hf_batchsched.schedules.scheduler",
    "hf_batchsched.data.sampler",
]

# What the brief and the README promise at the package root.
ROOT_NAMES = {
    "BatchRampTrainer",
    "BatchRampMixin",
    "RampBatchSampler",
    "PolicyLRScheduler",
    "make_lr_policy",
    "make_batch_schedule",
    "equivalent_to_lr",
    "SharpnessProbeCallback",
    "StabilityMonitorCallback",
    "BNRecalibrationCallback",
    "NoiseScaleCallback",
    "PlateauCallback",
    "SpikeGuardCallback",
    "LRMonitorCallback",
    "__version__",
}


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_resolves(module_name):
    module = importlib.import_module(module_name)
    names = module.__all__
    assert len(names) == len(set(names)), f"{module_name}.__all__ lists a name twice"
    missing = [name for name in names if getattr(module, name, None) is None]
    assert not missing, f"{module_name}.__all__ names that do not resolve: {missing}"


def test_root_exports_the_public_api():
    assert ROOT_NAMES <= set(hf_batchsched.__all__)
    assert set(hf_batchsched.__all__) == {"__version__", *hf_batchsched._EXPORTS}  # the lazy table is complete
    assert set(hf_batchsched.__all__) <= set(dir(hf_batchsched))
    from hf_batchsched.callbacks.sharpness import SharpnessProbeCallback
    from hf_batchsched.schedules.smith import equivalent_to_lr
    from hf_batchsched.trainer import BatchRampTrainer as Defined

    assert hf_batchsched.BatchRampTrainer is Defined  # the same object, not a copy
    assert hf_batchsched.SharpnessProbeCallback is SharpnessProbeCallback
    assert hf_batchsched.equivalent_to_lr is equivalent_to_lr
    assert isinstance(hf_batchsched.__version__, str) and hf_batchsched.__version__.count(".") == 2
    with pytest.raises(AttributeError, match="has no attribute 'BatchRampTrainr'"):
        hf_batchsched.BatchRampTrainr  # noqa: B018


def test_readme_imports():
    from hf_batchsched import BatchRampTrainer, make_batch_schedule, make_lr_policy

    assert issubclass(BatchRampTrainer, hf_batchsched.BatchRampMixin)
    assert make_batch_schedule("constant", size=8)(0) == 8
    assert make_lr_policy("FIX", k0=0.1)(0) == 0.1


def test_import_is_light():
    """``import hf_batchsched`` loads neither torch nor transformers; the first exported name loads its module."""
    code = (
        "import json, sys; import hf_batchsched; light = sorted(m for m in ('torch', 'transformers') if m in "
        "sys.modules); hf_batchsched.make_lr_policy; print(json.dumps([light, 'hf_batchsched.schedules.lr' in "
        "sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    light, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert light == [] and loaded


def test_one_implementation_of_the_sgd_noise_scale():
    from hf_batchsched import schedules, trainer
    from hf_batchsched.schedules.smith import sgd_noise

    assert schedules.sgd_noise is sgd_noise
    assert not hasattr(trainer, "sgd_noise_scale")  # the 0.1.0 alias is gone: one name, one implementation


def test_package_inits_have_no_appended_imports():
    """The package ``__init__`` files this module checks are one import block plus ``__all__``."""
    for module_name in ("hf_batchsched", "hf_batchsched.schedules", "hf_batchsched.data", "hf_batchsched.bench"):
        source = importlib.util.find_spec(module_name).origin
        with open(source) as file:
            text = file.read()
        assert "noqa: E402" not in text and "__all__ +=" not in text, module_name
