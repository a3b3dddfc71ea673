"""Benchmarks and reproductions: LRBench-style LR policy benchmark, the LR range test, the paper reproductions.

| module | what |
|---|---|
| ``lrbench`` (``lrbench_config``, ``lrbench_tasks``, ``lrbench_report``) | LR policies compared as short fine-tunes |
| ``range_test`` | the LR range test |
| ``task`` | the teacher-student task and MLP of the classifier reproductions |
| ``reproduce_smith``, ``reproduce_keskar``, ``reproduce_bjorck`` | Smith 2018, Keskar 2017, Bjorck 2018 |
| ``lm_task`` | the LM task of ``reproduce_seesaw`` and ``reproduce_critical_batch`` (``lm_report``: their tables) |
| ``overheads`` | the overhead table gathered from ``benchmarks/results/*.json`` |
| ``common`` | run and report helpers of the reproductions |
| ``plots`` | every figure (the only module that imports matplotlib) |
"""

from .lrbench import run_lrbench
from .lrbench_config import evaluate_utility, load_lrbench_config
from .range_test import RangeTestResult, lr_range_test

__all__ = ["RangeTestResult", "evaluate_utility", "load_lrbench_config", "lr_range_test", "run_lrbench"]
