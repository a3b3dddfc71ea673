"""The SGD noise scale of Smith & Le (2018) and Smith, Kindermans, Ying & Le (ICLR 2018).

For plain SGD with learning rate ``lr``, batch size ``B`` and ``N`` training samples the scale of the random
fluctuations is ``g = lr (N / B - 1)``; with momentum ``m`` it is ``g = lr (N / B - 1) / (1 - m)``. For
``B << N``, ``g ~ lr N / (B (1 - m))``, so the optimal batch grows like ``lr / (1 - m)``: dividing the LR by
``a`` is worth multiplying the batch by ``a`` (https://arxiv.org/abs/1711.00489, https://arxiv.org/abs/1710.06451).

These are plain functions of numbers; ``hf_batchsched.schedules.batch.equivalent_to_lr`` applies them along a whole
schedule. Note: ``g`` is the noise of the seeds' SGD analysis, not McCandlish et al.'s measured gradient noise
scale (a batch size, ``hf_batchsched.probes.noise_scale``).

>>> g = sgd_noise(0.1, dataset_size=50_000, batch_size=128, momentum=0.9)
>>> round(g, 4), round(batch_for_noise(g, lr=0.1, dataset_size=50_000, momentum=0.9), 6)
(389.625, 128.0)
"""

from __future__ import annotations

import math
import numbers

from ..errors import ConfigError

__all__ = ["batch_for_noise", "lr_for_noise", "rescale_batch_for_noise", "sgd_noise"]


def _number(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _positive(what: str, value) -> float:
    if not _number(what, value) > 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    return float(value)


def _momentum(value) -> float:
    if not 0 <= _number("momentum", value) < 1:
        raise ConfigError(f"momentum must be in [0, 1) (SGD's m, or Adam's beta1), got {value!r}")
    return float(value)


def _batch(batch_size, dataset_size) -> tuple[float, float]:
    batch, n = _positive("batch_size", batch_size), _positive("dataset_size", dataset_size)
    if batch > n:
        raise ConfigError(
            f"batch_size {batch_size} is larger than dataset_size {dataset_size}; the noise scale needs B <= N"
        )
    return batch, n


def sgd_noise(lr: float, dataset_size: int, batch_size: float, momentum: float = 0.0) -> float:
    """The SGD noise scale ``g = lr (N / B - 1) / (1 - m)``.

    Args:
        lr (`float`): the learning rate.
        dataset_size (`int`): ``N``, the number of training samples.
        batch_size (`float`): ``B``, the global batch size (``<= N``; ``B = N`` is full-batch descent, ``g = 0``).
        momentum (`float`, *optional*, defaults to `0.0`): ``m`` in ``[0, 1)``.

    >>> for lr, batch, m in ((0.1, 128, 0.0), (0.1, 128, 0.9), (0.1, 640, 0.0), (0.02, 128, 0.0), (0.1, 50_000, 0.0)):
    ...     print(lr, batch, m, f"{sgd_noise(lr, 50_000, batch, m):.6g}")
    0.1 128 0.0 38.9625
    0.1 128 0.9 389.625
    0.1 640 0.0 7.7125
    0.02 128 0.0 7.7925
    0.1 50000 0.0 0
    """
    batch, n = _batch(batch_size, dataset_size)
    return _number("lr", lr) * (n / batch - 1.0) / (1.0 - _momentum(momentum))


def batch_for_noise(noise: float, lr: float, dataset_size: int, momentum: float = 0.0) -> float:
    """The batch size with noise scale ``noise`` at ``lr``: ``B = N / (1 + g (1 - m) / lr)`` (a real number; round
    it with ``round_batch_size``).

    >>> round(batch_for_noise(38.9625, lr=0.1, dataset_size=50_000), 6)
    128.0
    >>> round(batch_for_noise(38.9625, lr=0.5, dataset_size=50_000), 3)  # 5x the LR: about 5x the batch
    633.513
    """
    g = _number("noise", noise)
    if g < 0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}")
    n = _positive("dataset_size", dataset_size)
    return n / (1.0 + g * (1.0 - _momentum(momentum)) / _positive("lr", lr))


def lr_for_noise(noise: float, dataset_size: int, batch_size: float, momentum: float = 0.0) -> float:
    """The learning rate with noise scale ``noise`` at batch ``B``: ``lr = g (1 - m) / (N / B - 1)``.

    >>> round(lr_for_noise(38.9625, dataset_size=50_000, batch_size=128), 12)
    0.1
    """
    batch, n = _batch(batch_size, dataset_size)
    if batch == n:
        raise ConfigError("at batch_size == dataset_size the noise is 0 for every LR; lr_for_noise needs B < N")
    return _number("noise", noise) * (1.0 - _momentum(momentum)) / (n / batch - 1.0)


def rescale_batch_for_noise(
    batch_size: float,
    *,
    lr: float,
    new_lr: float,
    momentum: float = 0.0,
    new_momentum: float | None = None,
    dataset_size: int | None = None,
) -> float:
    """The batch that keeps the noise scale when the LR (and momentum) change: ``B`` proportional to
    ``lr / (1 - m)``.

    Without ``dataset_size`` this is the ``B << N`` rule ``B' = B (new_lr / lr) (1 - m) / (1 - new_m)``; with it,
    the exact ``g = lr (N / B - 1) / (1 - m)`` is held fixed.

    Args:
        batch_size (`float`): the current batch size.
        lr (`float`): the current learning rate.
        new_lr (`float`): the new learning rate.
        momentum (`float`, *optional*, defaults to `0.0`): the current momentum.
        new_momentum (`float`, *optional*): the new momentum; defaults to ``momentum``.
        dataset_size (`int`, *optional*): ``N``, for the exact noise scale.

    Smith et al.'s "increase the effective LR" runs: ``lr 0.1 -> 0.5`` and ``m 0.9 -> 0.98`` take ``B = 128`` to
    ``128 * 5 * 5 = 3200``:

    >>> round(rescale_batch_for_noise(128, lr=0.1, new_lr=0.5, momentum=0.9, new_momentum=0.98), 6)
    3200.0
    >>> round(rescale_batch_for_noise(128, lr=0.1, new_lr=0.5, dataset_size=50_000), 3)
    633.513
    """
    new_momentum = momentum if new_momentum is None else new_momentum
    if dataset_size is not None:
        g = sgd_noise(lr, dataset_size, batch_size, momentum)
        return batch_for_noise(g, new_lr, dataset_size, new_momentum)
    ratio = _positive("new_lr", new_lr) / _positive("lr", lr)
    return _positive("batch_size", batch_size) * ratio * (1.0 - _momentum(momentum)) / (1.0 - _momentum(new_momentum))
