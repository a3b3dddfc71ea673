"""The recipe's model builder: a hub or local causal LM (or the embedded small Llama) and its tokenizer, with LoRA or
QLoRA adapters."""

from __future__ import annotations

import re
from pathlib import Path

from ..assets import demo_corpus, demo_model, demo_tokenizer
from ..errors import ConfigError
from .config import RecipeArguments

__all__ = ["load_model_and_tokenizer"]


def load_model_and_tokenizer(args: RecipeArguments, train_texts: list[str] | None = None):
    """Load (or, for the embedded default, build) the model and tokenizer, and attach LoRA/QLoRA adapters."""
    import torch

    margs, pargs = args.model, args.peft
    if margs.model_name_or_path is None:
        tokenizer = demo_tokenizer(train_texts if train_texts is not None else demo_corpus()[0])
        model = demo_model(len(tokenizer), seed=args.training.seed, attn_implementation=margs.attn_implementation)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"trust_remote_code": margs.trust_remote_code}
        if margs.attn_implementation:
            kwargs["attn_implementation"] = margs.attn_implementation
        if margs.dtype != "auto":
            kwargs["dtype"] = getattr(torch, margs.dtype)
        if pargs.peft == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        _check_model_source(margs.model_name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                margs.model_name_or_path, trust_remote_code=margs.trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kwargs)
        except OSError as error:  # a hub id that is neither cached nor reachable, or a folder without the files
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"config key 'model_name_or_path': cannot load {margs.model_name_or_path!r}: {first_line}"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if pargs.peft in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if pargs.peft == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(getattr(args.training, "activation_checkpointing", False))
            )
        targets = pargs.lora_target_modules
        config = LoraConfig(
            r=pargs.lora_r,
            lora_alpha=pargs.lora_alpha,
            lora_dropout=pargs.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            modules_to_save=pargs.lora_modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model, tokenizer


def _check_model_source(name: str) -> None:
    """Refuse a ``model_name_or_path`` that is neither an existing directory nor shaped like a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"config key 'model_name_or_path': {name!r} is a file; give the model's directory (with config.json) "
                "or a hub model id"
            )
        return
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name) is not None
    if not looks_like_hub_id:
        raise ConfigError(
            f"config key 'model_name_or_path': {name!r} does not exist (it is not a local directory, and not a hub "
            "model id such as 'org/name'); check the path"
        )
