"""hf_batchsched.data: the variable-size, distributed-aware, resumable ``RampBatchSampler`` and the step-batch
helpers (counting, micro-chunk splitting of padded and packed batches)."""

from .batches import count_batch, packed_sequence_starts, split_micro_chunks
from .lengths import sample_lengths, sequence_counts
from .sampler import DrawnStep, RampBatchSampler

__all__ = [
    "DrawnStep",
    "RampBatchSampler",
    "count_batch",
    "packed_sequence_starts",
    "sample_lengths",
    "sequence_counts",
    "split_micro_chunks",
]
