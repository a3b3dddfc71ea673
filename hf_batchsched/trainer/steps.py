"""One optimizer step of the ramp: ``training_step`` over micro-chunks, their counts, loss weights and gradient sync
(``RampStepsMixin``, a base of ``BatchRampMixin``)."""

from __future__ import annotations

import contextlib
import logging

import torch

from ..batching import batch_len, count_batch, packed_sequence_starts, split_micro_chunks
from ..chunk_checks import check_packed_batch, has_left_padding, leading_trim_candidate, trimmed_outputs_agree
from ..data.sampler import DrawnStep
from ..errors import ConfigError
from ..launch import (
    no_tokens_for_policy,
)
from ..loss_weights import chunk_accumulation, chunk_loss_weights, per_token_labels
from ..sharded_grads import accumulated_grad_sq_norm, step_grad_sq_norm

logger = logging.getLogger("hf_batchsched.trainer")  # one logger for the whole trainer package


class RampStepsMixin:
    """The step half of ``BatchRampMixin``: micro-chunk forward/backward with the loss normalised over the step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward the step batch in micro-chunks; only the last chunk synchronises gradients."""
        drawn = self._ramp_sampler.take_drawn_step() if self._ramp_sampler is not None else None
        packed = packed_sequence_starts(inputs) is not None
        if packed:
            inputs = self._prepare_packed_batch(model, inputs, num_items_in_batch, drawn)
        chunks = split_micro_chunks(
            inputs,
            self.max_micro_batch_size,
            trim_leading=not packed and self._leading_padding_trim_is_exact(model, inputs),
            labels_shifted=self._loss_shifts_labels,
        )
        world_size = self.accelerator.num_processes
        local_rows = batch_len(inputs)
        step_rows, step_samples, step_tokens = self._count_step(inputs, drawn, local_rows)
        if world_size > 1 and self.sharding_engine is not None:
            self._check_equal_chunk_counts(len(chunks))
        if self.is_deepspeed_enabled:  # the engine's batch bookkeeping follows the step (its boundary is set below)
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            engine.set_train_batch_size(len(chunks) * engine.train_micro_batch_size_per_gpu() * engine.dp_world_size)
        if not step_tokens and self.lr_policy is not None and self.lr_policy.unit == "tokens":
            raise no_tokens_for_policy(self.lr_policy)
        if num_items_in_batch is not None and self.compute_loss_func is None and not per_token_labels(inputs):
            # Items are examples here: per-example weighting (below) is the same normalisation, and it does not rely
            # on the model's forward honouring num_items_in_batch. Image classifiers such as
            # ResNetForImageClassification take **kwargs (so the Trainer passes it) but return a plain chunk mean,
            # which would make k chunks sum k means.
            num_items_in_batch = None
        accumulation = chunk_accumulation(inputs, chunks, step_rows, world_size, packed)
        chunk_listeners = self._chunk_listeners("on_micro_chunk_end")
        step_listeners = self._chunk_listeners("on_step_batch_end")
        # (items, loss weight) per chunk for the listeners; only computed when one listens (it reads
        # num_items_in_batch, which syncs with the device)
        listening = chunk_listeners or step_listeners
        weights = self._chunk_loss_weights(chunks, num_items_in_batch, accumulation) if listening else None
        total_loss = None
        for index, chunk in enumerate(chunks):
            self.current_gradient_accumulation_steps = accumulation[index]
            if weights is not None:
                self.current_chunk_num_items, self.current_chunk_loss_weight = weights[index]
            last = index == len(chunks) - 1
            # DeepSpeed: accelerate marks the engine's accumulation boundary from sync_gradients, and steps there
            self.accelerator.gradient_state._set_sync_gradients(last)
            with self._chunk_sync_context(model, last):
                loss = super().training_step(model, chunk, num_items_in_batch)
            total_loss = loss if total_loss is None else total_loss + loss
            chunk_samples = count_batch(chunk)[0] if packed else batch_len(chunk)
            for callback in chunk_listeners:
                callback.on_micro_chunk_end(self, index, len(chunks), chunk_samples)
        self.clock.advance(samples=step_samples, tokens=step_tokens)
        self.ramp_position = drawn.consumed_rows if drawn is not None else self.ramp_position + step_rows
        self.last_step_rows = step_rows
        self.last_batch_size, self.last_micro_chunks = step_samples, len(chunks)
        for callback in step_listeners:
            callback.on_step_batch_end(self, step_samples)
        return total_loss

    def _count_step(self, inputs: dict, drawn: DrawnStep | None, local_rows: int) -> tuple[int, int, int]:
        """Global ``(rows, samples, tokens)`` of the step batch.

        The sampler's accounting of the rows it drew is the clock of record (samples are sequences; tokens are the
        rows' non-pad tokens, ``sample_lengths``), so the clock, the token schedules and a resumed sampler agree even
        when the collator truncates. Without it (a batch that did not come from the ramp's sampler), or without
        lengths, the collated batch is counted (one all-reduce under DDP).
        """
        sampler = self._ramp_sampler
        if drawn is not None and sampler.lengths is not None:
            mask = inputs.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2 and int(mask.sum()) != drawn.local_tokens:
                self._warn_once(
                    "collated_tokens",
                    "BatchRampTrainer: the collated batch holds %d non-pad tokens but its dataset rows hold %d (the "
                    "collator truncates or drops tokens); the clock and token schedules count the dataset rows' "
                    "tokens. Truncate the dataset instead so both agree",
                    int(mask.sum()),
                    drawn.local_tokens,
                )
            return drawn.rows, drawn.samples, drawn.tokens
        samples, tokens = count_batch(inputs)
        rows = local_rows
        if self.accelerator.num_processes > 1:  # the collated batch is still on the CPU; one small all-reduce
            counts = torch.tensor([rows, samples, tokens], dtype=torch.long, device=self.args.device)
            rows, samples, tokens = (int(value) for value in self.accelerator.reduce(counts, "sum").tolist())
        if drawn is not None:
            return drawn.rows, drawn.samples, tokens
        return rows, samples, tokens

    def _warn_once(self, key: str, message: str, *args) -> None:
        warned = self.__dict__.setdefault("_ramp_warned", set())
        if key not in warned:
            warned.add(key)
            logger.warning(message, *args)

    def _prepare_packed_batch(self, model, inputs: dict, num_items_in_batch, drawn: DrawnStep | None) -> dict:
        """Checks that a packed (flattened) step batch can be chunked exactly; turns the model's cache off.

        The block-diagonal attention of packed sequences comes from ``position_ids`` only when the model runs
        without a cache (transformers builds it when ``attention_mask`` is None and no cache is passed; a model whose
        config has ``use_cache=True`` creates one even in training), so ``use_cache=False`` is added, as trl does.
        """
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        attn_implementation = getattr(config, "_attn_implementation", None)
        drawn_samples = None if drawn is None else drawn.local_samples
        check_packed_batch(inputs, num_items_in_batch, attn_implementation, drawn_samples)
        if getattr(config, "use_cache", False) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}
        return inputs

    def _leading_padding_trim_is_exact(self, model, inputs: dict) -> bool:
        """Whether cutting a chunk's leading all-pad columns leaves the model's outputs unchanged: decided once, on the
        first chunk that would lose leading columns, by running it both ways (no grad, eval mode); kept under FSDP or
        for 16-bit logits (``docs/batch-ramp.md``, "Padding")."""
        if self._leading_trim_exact is not None:
            return self._leading_trim_exact
        if not has_left_padding(inputs):
            return False  # no left padding in this batch: decide on a batch that has some
        if not self._loss_shifts_labels or self.is_fsdp_enabled:
            self._leading_trim_exact = False
            return False
        candidate = leading_trim_candidate(inputs, self.max_micro_batch_size)
        if candidate is None:
            return False
        untrimmed, trimmed, removed = candidate
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        device = self.args.device
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                strip = {"labels", "shift_labels"}
                full = unwrapped(**{k: v for k, v in self._prepare_inputs(untrimmed).items() if k not in strip})
                cut = unwrapped(**{k: v for k, v in self._prepare_inputs(trimmed).items() if k not in strip})
        finally:
            unwrapped.train(was_training)
        exact = trimmed_outputs_agree(
            getattr(full, "logits", None), getattr(cut, "logits", None), removed, trimmed, device
        )
        self._leading_trim_exact = exact
        logger.info(
            "BatchRampTrainer: left padding is %s per micro-chunk (%s)",
            "trimmed" if exact else "kept",
            "the model's outputs do not change without the leading pad columns"
            if exact
            else "cutting the leading pad columns changes this model's outputs (eager attention, absolute positions "
            "or 16-bit logits)",
        )
        return exact

    def _chunk_sync_context(self, model, last: bool):
        """How a chunk's gradient is synchronised: DDP and FSDP1 defer all but the last chunk (``no_sync``); ZeRO
        reduces in its own backward hooks (partitioned gradients) and steps at the boundary; FSDP2 reduce-scatters
        every chunk (``fsdp_gradient_sync="every_chunk"``: gradients stay sharded) or only the last one (unsharded
        gradients of the whole model accumulate on every rank until then)."""
        if last or self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        if self.sharding_engine == "fsdp2" and self.fsdp_gradient_sync == "every_chunk":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model=model)

    def _check_equal_chunk_counts(self, num_chunks: int) -> None:
        """Sharded engines run collectives in every chunk's backward: all ranks must run the same number."""
        extremes = torch.tensor([num_chunks, -num_chunks], dtype=torch.long, device=self.args.device)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        if int(extremes[0]) != -int(extremes[1]):
            raise ConfigError(
                f"ranks split this step into {-int(extremes[1])} to {int(extremes[0])} micro-chunks; under "
                f"{self.sharding_engine} every rank must run the same number (each backward communicates). Use a "
                "batch_size_multiple of max_micro_batch_size * world_size"
            )

    @property
    def reduces_every_chunk(self) -> bool:
        """Whether each chunk's gradient is reduced over ranks in its own backward (ZeRO-2/3, FSDP2 with
        ``fsdp_gradient_sync="every_chunk"``); under DDP, ZeRO-0/1 and FSDP1 only the last chunk's is."""
        return self.sharding_engine in ("zero2", "zero3") or (
            self.sharding_engine == "fsdp2" and self.fsdp_gradient_sync == "every_chunk"
        )

    def accumulated_grad_sq_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Squared norm of the gradient accumulated so far in this step, as this trainer's engine holds it
        (``hf_batchsched.sharded_grads.accumulated_grad_sq_norm``). With a sharded engine every rank must call it."""
        return accumulated_grad_sq_norm(self.sharding_engine, params)

    def step_grad_sq_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Squared norm of the whole step's reduced gradient, read after the last chunk's backward
        (``hf_batchsched.sharded_grads.step_grad_sq_norm``)."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine if self.is_deepspeed_enabled else None
        return step_grad_sq_norm(self.sharding_engine, params, deepspeed_engine=engine)

    def _chunk_loss_weights(self, chunks: list[dict], num_items_in_batch, accumulation: list[float]) -> list[tuple]:
        """``(items, loss weight)`` of each chunk (``hf_batchsched.loss_weights``), from the Trainer's settings."""
        token_normalised = num_items_in_batch is not None and (
            self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        )
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since transformers 5.19
        if scaled_for_ga is None:
            scaled_for_ga = token_normalised or self.compute_loss_func is not None
        items_scale = 1
        if token_normalised and self.args.average_tokens_across_devices:
            world_size = self.accelerator.num_processes
            items_scale = world_size // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return chunk_loss_weights(
            chunks,
            num_items_in_batch,
            accumulation,
            token_normalised=token_normalised,
            scaled_for_ga=scaled_for_ga,
            items_scale=items_scale,
            labels_shifted=self._loss_shifts_labels,
        )

    # ---- logging -------------------------------------------------------------------------------
