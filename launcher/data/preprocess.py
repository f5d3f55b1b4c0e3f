"""Prepare the training data once: tokenize, mix, split, pack, cache, and say what happened.

The result is saved with datasets' Arrow format under ``data.cache_dir`` (default
``<output.dir>/data``) in a directory named by a hash of everything it depends on: the tokenizer
files, each data file's path, size and modification time, the data settings and the seed. Under
several processes, rank 0 prepares while the others wait at a barrier (``distributed.timeout_minutes``)
and then read the cache; ``ftl preprocess RECIPE`` prepares it before a job starts, so no rank
tokenizes at all (what keeps big multi-node jobs clear of NCCL timeouts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ftl import objectives
from ftl.recipe.schema import DataSource, Recipe
from ftl.data.sources import DataError, build_dataset
from ftl.errors import first_line
from ftl.checkpoints.rundir import RunDir
from ftl.objectives.batch import IGNORE_INDEX
from ftl.data.packing import pack_dataset

log = logging.getLogger(__name__)

STATS = "data_stats.json"


def cache_dir(recipe: Recipe, tokenizer: Any) -> Path:
    root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else RunDir(Path(recipe.output.dir)).data_cache
    return root / cache_key(recipe, tokenizer)


# Bump when ftl renders, tokenizes or masks rows differently: caches of the old way are not reused.
# 2: conversations rendered once and masked by character spans (ftl.data.chat).
ROWS_VERSION = 2


def cache_key(recipe: Recipe, tokenizer: Any) -> str:
    digest = hashlib.sha256()
    settings = recipe.data.model_dump(mode="json", exclude={"cache_dir"})
    digest.update(json.dumps({"data": settings, "seed": recipe.train.seed, "rows": ROWS_VERSION}, sort_keys=True).encode())
    for name, value in sorted(tokenizer.init_kwargs.items()):
        digest.update(f"{name}={value}".encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(tokenizer.chat_template).encode())
    for source in recipe.data.train + recipe.data.eval_sources():
        for path in _files(source):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _files(source: DataSource) -> list[Path]:
    path = Path(source.path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def eval_dir(name: str) -> str:
    """Where eval set ``name`` is cached (the unnamed set where it always was)."""
    return "eval" if name == "eval" else f"eval-{name}"


def prepare(recipe: Recipe, tokenizer: Any) -> tuple[datasets.Dataset, dict[str, datasets.Dataset], dict[str, Any]]:
    """Train set (packed if asked), the eval sets by name and statistics, from the cache when it is there."""
    directory = cache_dir(recipe, tokenizer)
    if (directory / STATS).is_file():
        try:
            loaded = _load(directory)
            log.info("using preprocessed data from %s", directory)
            return loaded
        except Exception as err:  # a damaged cache is derived data: build it again
            log.warning("preprocessed data in %s is unreadable (%s); preparing it again", directory, first_line(err))
    stale = directory.exists()
    stats: dict[str, Any] = {"sources": []}
    cfg = recipe.data
    train_set = build_dataset(cfg.train, tokenizer, cfg, seed=recipe.train.seed, stats=stats["sources"])
    eval_sets = {name: build_dataset(sources, tokenizer, cfg) for name, sources in cfg.eval_sets().items()}
    if cfg.eval_fraction:
        order = np.random.default_rng(recipe.train.seed).permutation(len(train_set))
        held_out = max(1, round(cfg.eval_fraction * len(train_set)))
        if held_out >= len(train_set):
            raise DataError(f"data.eval_fraction: holding out {held_out} of {len(train_set)} rows leaves none to train on; "
                            "lower it or add data")
        eval_sets = {"eval": train_set.select(sorted(order[:held_out].tolist()))}
        train_set = train_set.select(sorted(order[held_out:].tolist()))
    stats.update(_length_stats(train_set))
    if cfg.packing and not objectives.for_recipe(recipe).packs_batches:  # else packed per micro-batch (collate)
        train_set, packing = pack_dataset(train_set, cfg.max_length)
        stats.update(packing)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_set.save_to_disk(str(tmp / "train"))
    for name, rows in eval_sets.items():
        rows.save_to_disk(str(tmp / eval_dir(name)))
    stats["eval_sets"] = list(eval_sets)
    (tmp / STATS).write_text(json.dumps(stats, indent=2))
    _publish(tmp, directory, stale)
    return _load(directory)


def _publish(tmp: Path, directory: Path, stale: bool) -> None:
    """Rename the finished cache into place. Another process may have finished the same cache
    meanwhile (each machine's launcher prepares the data of a multi-machine run on the shared run
    directory): theirs is kept and ours dropped, never deleted under a process reading it."""
    if (directory / STATS).is_file() and not stale:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if stale:
        shutil.rmtree(directory, ignore_errors=True)  # the damaged cache found at the start
    try:
        os.replace(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / STATS).is_file():
            raise


def _load(directory: Path) -> tuple[datasets.Dataset, dict[str, datasets.Dataset], dict[str, Any]]:
    train_set = datasets.load_from_disk(str(directory / "train"))
    stats = json.loads((directory / STATS).read_text())
    names = stats.get("eval_sets", ["eval"] if (directory / "eval").is_dir() else [])  # (caches from before named sets)
    eval_sets = {name: datasets.load_from_disk(str(directory / eval_dir(name))) for name in names}
    stats["cache"] = str(directory)
    return train_set, eval_sets, stats


def _length_stats(dataset: datasets.Dataset) -> dict[str, Any]:
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    trainable = sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset["labels"])
    percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    return {"examples": int(len(lengths)), "tokens": int(lengths.sum()), "trainable_tokens": int(trainable),
            "length": {**percentiles, "max": int(lengths.max()), "mean": float(lengths.mean())}}


def shown_rows(dataset: Any, tokenizer: Any, count: int, marked: bool) -> list[Any]:
    """The first ``count`` training rows as the model sees them, trained tokens apart from the rest
    (as Axolotl's ``--debug`` shows them): a rich Text per sequence, trained spans green and the
    rest dim, or, ``marked`` (not a terminal), trained spans between ``[[`` and ``]]``."""
    from rich.text import Text

    from ftl.objectives.batch import IGNORE_INDEX

    shown = []
    for index in range(min(count, len(dataset))):
        row = dataset[index]
        for ids_key, labels_key, name in (("input_ids", "labels", ""), ("rejected_input_ids", "rejected_labels", " rejected"),
                                          ("kl_input_ids", "kl_labels", " mismatched (KTO's KL)")):
            if ids_key not in row:
                continue
            text = Text(f"row {index}{name}: {len(row[ids_key])} tokens, "
                        f"{sum(label != IGNORE_INDEX for label in row[labels_key])} trained\n", style="bold")
            spans: list[tuple[bool, list[int]]] = []
            for token, label in zip(row[ids_key], row[labels_key]):
                trained = label != IGNORE_INDEX
                if spans and spans[-1][0] == trained:
                    spans[-1][1].append(token)
                else:
                    spans.append((trained, [token]))
            for trained, tokens in spans:
                piece = tokenizer.decode(tokens)
                if marked:
                    text.append(f"[[{piece}]]" if trained else piece)
                else:
                    text.append(piece, style="green" if trained else "dim")
            shown.append(text)
    return shown
