"""hf_batchsched.bench"""

from .lrbench import evaluate_utility, load_lrbench_config, run_lrbench  # noqa: E402, F401  (LR benchmark)
from .range_test import RangeTestResult, lr_range_test  # noqa: E402, F401  (LR range test)
