"""hf_batchsched.data: the variable-size, distributed-aware, resumable ``RampBatchSampler`` and sample lengths.

Counting and splitting collated batches is ``hf_batchsched.batching``."""

from .lengths import sample_lengths, sequence_counts
from .sampler import DrawnStep, RampBatchSampler

__all__ = [
    "DrawnStep",
    "RampBatchSampler",
    "sample_lengths",
    "sequence_counts",
]
