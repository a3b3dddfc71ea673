"""Reading a recipe config: a YAML file or a dict, plus ``--key value`` overrides, through one
``transformers.HfArgumentParser`` over the recipe's dataclasses and ``TrainingArguments``.

Every value is read the way the command line reads it: a YAML or dict value is written as its ``--key value`` words
and parsed with the overrides after it (the last one wins), so the parser's own types convert and check it
(``"1e-4"`` is a float, ``1.5`` is no ``max_steps``). Mappings (callback sections, a ``deepspeed`` dict), lists for
single-valued keys (``report_to: [tensorboard]``) and ``null`` pass through as parser defaults; section values
given as strings are JSON (``--sharpness '{"every_n_steps": 50}'``).

The parser is wrapped in two places, for one-line errors with the key's name (``ConfigError``, exit code 2 from the
CLI): unknown keys are refused with a "did you mean" before parsing (``HfArgumentParser.parse_dict`` would only
list them), and argparse's usage errors are raised, not printed with the usage and exited.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError
from .config import SECTION_FIELDS, RecipeArguments, dataclass_types
from .validation import check_qlora_device, validate

__all__ = ["load_config_file", "parse_args", "parse_config"]


def load_config_file(path: str | Path) -> dict:
    """Read a recipe YAML config into a dict (an empty file is an empty config)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML ({problem}); fix the file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _parser():
    """``HfArgumentParser`` over ``dataclass_types()`` whose usage errors raise ``ConfigError`` (one line, the key
    named) instead of printing the usage and exiting; options are spelled in full (``allow_abbrev=False``)."""
    from transformers import HfArgumentParser

    class RecipeParser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(_one_line_error(message))

    return RecipeParser(dataclass_types(), allow_abbrev=False)


_TYPE_NAMES = {"int": "an integer", "float": "float"}


def _one_line_error(message: str) -> str:
    """argparse's ``argument --max_steps: invalid int value: '1.5'`` as ``config key 'max_steps': expected an
    integer (invalid int value: '1.5')``; other usage errors as ``config key 'key': problem``."""
    match = re.fullmatch(r"argument --(\w+)(?:/--[\w-]+)*: (.*)", message.strip(), flags=re.S)
    if match is None:
        return f"{message} (see --help)"
    key, problem = match.groups()
    kind = re.match(r"invalid (\w+) value", problem)
    if kind is None:
        return f"config key {key!r}: {problem}"
    return f"config key {key!r}: expected {_TYPE_NAMES.get(kind.group(1), kind.group(1))} ({problem})"


def _field_hints() -> dict[str, typing.Any]:
    hints = {}
    for cls in dataclass_types():
        types_by_name = typing.get_type_hints(cls)
        hints.update({item.name: types_by_name[item.name] for item in dataclasses.fields(cls) if item.init})
    return hints


def _takes_list(hint) -> bool:
    """Whether the parser reads the key as a list (``nargs="+"``): ``list[...]`` or ``Optional[list[...]]``; a union
    with other types (``report_to: str | list[str] | None``) is read as one word, so its lists are defaults."""
    if typing.get_origin(hint) is list:
        return True
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return len(options) == 1 and typing.get_origin(options[0]) is list


def _as_words(config: Mapping, hints: dict) -> tuple[list[str], dict]:
    """``(words, defaults)``: scalars (and lists for list-valued keys) as ``--key value`` words for the parser;
    mappings, other lists and ``None`` as parser defaults."""
    words, defaults = [], {}
    for key, value in config.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            raise ConfigError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(value, (list, tuple)) and _takes_list(hints[key]) and value:
            words += [f"--{key}", *map(str, value)]
        elif value is None or isinstance(value, (Mapping, list, tuple)):
            defaults[key] = dict(value) if isinstance(value, Mapping) else value
        elif isinstance(value, bool):
            words += [f"--{key}", str(value).lower()]
        else:  # 2.0 reads as 2 (an integer key takes it); 1.5 stays 1.5 (refused there)
            words += [f"--{key}", str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)]
    return words, defaults


def _section(key: str, value):
    """A section key's value: a mapping, a name or number, or ``None``; a string is read as JSON if it looks so."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "null", "none"):
            return None
        if text.startswith(("{", "[")) or re.fullmatch(r"-?\d+", text):
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"config key {key!r}: invalid JSON ({error.msg}): {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (Mapping, int)) and value is not None:
        raise ConfigError(f"config key {key!r}: expected a section (a mapping), got {value!r}")
    return value


def _parse(config: Mapping, overrides: Sequence[str] = (), *, check_device: bool = True) -> RecipeArguments:
    if check_device:  # first, before transformers is imported: its device checks (and bitsandbytes' notices) say less
        given = [overrides[i + 1] for i, word in enumerate(overrides[:-1]) if word == "--peft"]
        check_qlora_device(given[-1] if given else config.get("peft"))
    hints = _field_hints()
    words, defaults = _as_words(config, hints)
    words += list(overrides)
    parser = _parser()
    parser.set_defaults(**defaults)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=words, return_remaining_strings=True, look_for_args_file=False
        )
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's own check, e.g. TrainingArguments.__post_init__
        raise ConfigError(f"invalid setting: {str(error).strip().splitlines()[0]}") from None
    if remaining:
        raise ConfigError(f"unknown command-line option(s): {' '.join(remaining)}")
    model, data, peft, schedule, callbacks, training = parsed
    for obj in (schedule, callbacks):
        for key in SECTION_FIELDS:
            if hasattr(obj, key):
                setattr(obj, key, _section(key, getattr(obj, key)))
    args = RecipeArguments(model, data, peft, schedule, callbacks, training)
    validate(args, check_device=check_device)
    return args


def parse_config(config: Mapping, *, check_device: bool = True) -> RecipeArguments:
    """Build ``RecipeArguments`` from a flat config dict, checking every key and value, then ``validate`` it.

    Args:
        config (`Mapping`): config keys (fields of the recipe's dataclasses and of ``TrainingArguments``) to values.
        check_device (`bool`, *optional*, defaults to `True`): also check that this machine can run the config
            (QLoRA needs a CUDA GPU); ``False`` validates a config meant for another machine.
    """
    return _parse(config, check_device=check_device)


def parse_args(argv: Sequence[str] | None = None) -> RecipeArguments:
    """Parse ``--config path.yaml`` plus ``--key value`` overrides (HfArgumentParser syntax) into ``RecipeArguments``;
    an override on the command line wins over the YAML."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return _parse(load_config_file(known.config) if known.config else {}, rest)
