"""The demo's offline text and tokenizer: Python standard-library source code (the fine-tuning text), Python's
language reference (the base model's text), and a byte-level BPE trained on them and cached on disk.

Example:

>>> corpus = stdlib_corpus(modules=("json", "textwrap"))
>>> sorted(corpus)
['json', 'textwrap']
>>> "def dumps(" in corpus["json"]
True
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "DEMO_MODULES",
    "DEMO_TRAIN_CHARS",
    "base_corpus",
    "cache_dir",
    "code_chunks",
    "demo_corpus",
    "demo_tokenizer",
    "stdlib_corpus",
]

# Pure-Python standard-library modules whose source code is the fine-tuning text (4.1 MB with Python 3.11, of which
# DEMO_TRAIN_CHARS are used). Modules without a .py file in a Python build (frozen or missing) are skipped.
DEMO_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd",
    "codecs", "collections", "colorsys", "concurrent.futures._base", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookies", "http.server",
    "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "json", "keyword", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip

# Characters of training code the fine-tune reads: a fixed sample of the training modules' pieces (``demo_corpus``),
# about 5,600 sequences of 64 tokens: one pass is ~400 optimizer steps (~25 s on one CPU thread).
DEMO_TRAIN_CHARS = 780_000


def cache_dir() -> Path:
    """Where the demo caches its tokenizer and base model: ``$HF_BATCHSCHED_CACHE``, else
    ``~/.cache/hf_batchsched``."""
    return Path(os.environ.get("HF_BATCHSCHED_CACHE", Path.home() / ".cache" / "hf_batchsched")).expanduser()


def _definition_start(node: ast.AST) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def code_chunks(source: str) -> list[str]:
    """Cut Python source into definition-sized pieces: one per top-level statement, with each method of a
    top-level class a piece of its own. A piece starts at its statement (or its first decorator) and runs to the
    next one; surrounding blank lines are dropped.

    Args:
        source (`str`): the text of a Python file.

    Returns:
        `list[str]`: the pieces, in file order; joined with newlines they give back every non-blank line.

    >>> code_chunks("import os\\n\\nclass A:\\n    x = 1\\n\\n    @property\\n    def f(self):\\n        return 2\\n")
    ['import os', 'class A:\\n    x = 1', '    @property\\n    def f(self):\\n        return 2']
    """
    lines = source.splitlines(keepends=True)
    starts = {1}
    for node in ast.parse(source).body:
        starts.add(_definition_start(node))
        if isinstance(node, ast.ClassDef):
            starts.update(
                _definition_start(member)
                for member in node.body
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    cuts = sorted(starts) + [len(lines) + 1]
    pieces = ("".join(lines[start - 1 : end - 1]).strip("\n") for start, end in zip(cuts, cuts[1:]))
    return [piece for piece in pieces if piece.strip()]


def stdlib_corpus(modules: tuple[str, ...] = DEMO_MODULES) -> dict[str, str]:
    """The Python source of each standard-library module in ``modules``, read from its file (nothing is imported).

    Args:
        modules (`tuple[str, ...]`, *optional*, defaults to `DEMO_MODULES`): dotted module names; those without
            a ``.py`` source file in this interpreter (frozen or built-in ones, such as ``os`` on 3.11) are skipped.

    Returns:
        `dict[str, str]`: module name -> its source text, in ``modules`` order.
    """
    corpus = {}
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py"):
            corpus[name] = Path(origin).read_text(encoding="utf-8")
    return corpus


def _digest_order(texts: list[str]) -> list[str]:
    """A fixed shuffle: sorted by content hash, so it depends on nothing but the texts."""
    return sorted(texts, key=lambda text: hashlib.sha256(text.encode()).digest())


@functools.lru_cache(maxsize=4)
def demo_corpus(eval_every: int = 8, max_train_chars: int | None = DEMO_TRAIN_CHARS) -> tuple[list[str], list[str]]:
    """The fine-tuning text: ``stdlib_corpus()`` cut into ``code_chunks``, split by module, every
    ``eval_every``-th module (in ``stdlib_corpus`` order) held out for evaluation.

    Both splits come in a fixed shuffled order (sorted by content hash), so any prefix, such as the recipe's
    ``max_eval_samples`` sequences, spans many modules. The training split is then cut to its first pieces
    totalling ``max_train_chars`` characters, a deterministic sample of every training module that keeps the demo
    short.

    Args:
        eval_every (`int`, *optional*, defaults to `8`): hold out every ``eval_every``-th module.
        max_train_chars (`int`, *optional*, defaults to `DEMO_TRAIN_CHARS`): character budget of the training
            split; `None` keeps all of it (about 3.7 MB with Python 3.11).

    Returns:
        `tuple[list[str], list[str]]`: training pieces and held-out pieces; cached, do not modify them.
    """
    train, held_out = [], []
    for index, source in enumerate(stdlib_corpus().values()):
        (held_out if index % eval_every == eval_every - 1 else train).extend(code_chunks(source))
    train = _digest_order(train)
    if max_train_chars is not None:
        total, keep = 0, 0
        while keep < len(train) and total < max_train_chars:
            total += len(train[keep])
            keep += 1
        train = train[:keep]
    return train, _digest_order(held_out)


@functools.lru_cache(maxsize=1)
def base_corpus() -> tuple[str, ...]:
    """The base model's text: the topics of Python's language reference that ``help()`` shows (``pydoc_data.topics``,
    about 0.46 MB with Python 3.11), read from the source file with ``ast`` (nothing is imported).

    Returns:
        `tuple[str, ...]`: one text per topic (``"assert"``, ``"for"``, ``"numbers"``, ...), in file order.

    Raises:
        `ConfigError`: when this Python build ships no ``pydoc_data/topics.py``.
    """
    spec = importlib.util.find_spec("pydoc_data.topics")
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        raise ConfigError(
            "the demo's base model trains on pydoc_data/topics.py, which this Python build lacks; "
            "install the full standard library (e.g. Debian's libpython3-stdlib) to run the demo"
        )
    for node in ast.parse(Path(origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return tuple(str(text) for text in ast.literal_eval(node.value).values())
    raise ConfigError(f"{origin} holds no 'topics' dict; the demo cannot build its base model")


def demo_tokenizer(texts: list[str], vocab_size: int = 512, directory: str | Path | None = None):
    """A byte-level BPE tokenizer trained on ``texts``, cached on disk and reloaded when the texts are the same.

    Args:
        texts (`list[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to `512`): vocabulary size, special tokens included.
        directory (`str` or `Path`, *optional*): the cache root; defaults to ``cache_dir()``.

    Returns:
        `transformers.PreTrainedTokenizerFast` with ``<pad>`` (id 0), ``<s>`` (1) and ``</s>`` (2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(("\0".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = Path(directory or cache_dir()) / f"demo-tokenizer-{digest}"
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    if not (path / "tokenizer.json").exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
        fast.save_pretrained(path)  # written whole, then visible: a concurrent reader sees all or nothing
    return PreTrainedTokenizerFast.from_pretrained(path)
