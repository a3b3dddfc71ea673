"""Benchmarks: the LRBench-style LR policy benchmark and the LR range test."""

from .lrbench import evaluate_utility, load_lrbench_config, run_lrbench
from .range_test import RangeTestResult, lr_range_test

__all__ = ["RangeTestResult", "evaluate_utility", "load_lrbench_config", "lr_range_test", "run_lrbench"]
