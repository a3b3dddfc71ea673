"""hf_batchsched.data: the variable-size, distributed-aware, resumable ``RampBatchSampler``."""

from .sampler import RampBatchSampler, as_batch_schedule, sample_lengths

__all__ = ["RampBatchSampler", "as_batch_schedule", "sample_lengths"]
