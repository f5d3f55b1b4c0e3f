"""Training data: load sources, tokenize each row as its format does (``ftl.data.formats``), draw each
source's share, and deal the rows into micro-batches.

Every example becomes ``input_ids`` and ``labels`` of equal length, with ``-100`` wherever the
model must not be trained (the prompt, unless ``data.mask_prompt`` is off).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch

from ftl.data.chat import check_tokenizer
from ftl.recipe.schema import DataSection, DataSource
from ftl.errors import DataError, first_line
from ftl.data.formats import FORMATS
from ftl.objectives.batch import IGNORE_INDEX
from ftl.data.pairs import INVALID

log = logging.getLogger(__name__)

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bar for datasets' own bookkeeping (reading a local file, filtering): it says
    nothing about the run; ftl's tokenizing bar, which takes the time, stays."""
    was = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.utils.enable_progress_bars()


def load_source(source: DataSource, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """Load one source as a ``datasets.Dataset`` (local file, directory of files or a dataset name);
    ``streaming``: as an ``IterableDataset`` read lazily."""
    path = Path(source.path).expanduser()
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unsupported data file type; use .json, .jsonl, .parquet or .csv")
        return _load(kind, data_files=str(path), where=str(path), streaming=streaming)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in FILE_TYPES)
        kinds = {FILE_TYPES[Path(f).suffix.lower()] for f in files}
        if len(kinds) != 1:
            raise DataError(f"{path}: expected data files of one type (.jsonl, .json, .parquet or .csv), found {files}")
        return _load(kinds.pop(), data_files=files, where=str(path), streaming=streaming)
    if path.suffix.lower() in FILE_TYPES or source.path.startswith((".", "/", "~")):
        raise DataError(f"{source.path}: data file not found (relative paths are resolved from {Path.cwd()})")
    try:
        return datasets.load_dataset(source.path, source.subset, split=source.split, streaming=streaming)
    except Exception as err:  # datasets raises many kinds; the user needs only the gist
        raise DataError(f"{source.path}: could not load dataset '{source.path}' (split {source.split}): {first_line(err)}") from None


def _load(kind: str, data_files: Any, where: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    for name in [data_files] if isinstance(data_files, str) else data_files:
        if kind == "json":
            _check_json_rows_once(Path(name), limit=100 if streaming else None)
    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(kind, data_files=data_files, split="train", streaming=streaming)
    except Exception as err:  # parquet/csv parsers raise many kinds; the user needs the file and the gist
        raise DataError(f"{where}: could not read as {kind}: {first_line(err)}") from None
    if not streaming and len(dataset) == 0:
        raise DataError(f"{where}: no rows")
    return dataset


_CHECKED: set[tuple] = set()


def _check_json_rows_once(path: Path, limit: int | None) -> None:
    """:func:`check_json_rows` once per version of a file in this process: training loads each
    source twice (a fail-fast check before the model loads, then to tokenize)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, limit)
    if key not in _CHECKED:
        check_json_rows(path, limit)
        _CHECKED.add(key)


def check_json_rows(path: Path, limit: int | None = None) -> None:
    """Name the line (``.jsonl``) or file (``.json``) that is not UTF-8 JSON rows, before datasets
    reports it as "position 30" or "An error occurred while generating the dataset".

    ``limit``: check only the first lines (a stream too large to read twice)."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_bytes())
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except ValueError as err:
            raise DataError(f"{path}: line {getattr(err, 'lineno', '?')}: not valid JSON ({getattr(err, 'msg', err)})") from None
        rows = data if isinstance(data, list) else None
        if rows is None and isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return  # columns: {"instruction": [...], "output": [...]}
        if rows is None:
            raise DataError(f"{path}: a .json data file holds a list of rows (objects) or a mapping of columns")
        if not rows:
            raise DataError(f"{path}: no rows")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i}: a row must be a JSON object, got {type(row).__name__}")
        return
    rows = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and number > limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: line {number}: not UTF-8 text ({err.reason})") from None
            except ValueError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({getattr(err, 'msg', err)})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: a row must be a JSON object, got {type(row).__name__}")
            rows += 1
    if rows == 0:
        raise DataError(f"{path}: no rows (the file is empty)")




# ----------------------------------------------------------------------------- tokenizing


def tokenize_row(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    """Tokenize one row of ``source`` as its format does (``ftl.data.formats``): ``input_ids``/``labels``
    truncated to ``cfg.max_length``, ``truncated``, and what else the format's rows carry."""
    return FORMATS[source.format].tokenize(row, source, tokenizer, cfg, where)


def build_dataset(
    sources: list[DataSource], tokenizer: Any, cfg: DataSection, seed: int = 0, stats: list[dict] | None = None
) -> datasets.Dataset:
    """Load, render and tokenize every source, draw each one's share (``weight``/``samples``,
    deterministic by ``seed``), and concatenate them in order; ``stats`` gets one dict per source."""
    parts = []
    for number, source in enumerate(sources):
        raw = load_source(source)
        name = source.path
        if FORMATS[source.format].conversation:
            check_tokenizer(tokenizer, source)

        def encode(row: dict, index: int, source: DataSource = source, name: str = name) -> dict[str, Any]:
            return tokenize_row(row, source, tokenizer, cfg, where=f"{name}: row {index}")

        tokenized = raw.map(encode, with_indices=True, remove_columns=raw.column_names, desc=f"tokenizing {name}")
        n_truncated = sum(tokenized["truncated"])
        reasons = {}
        if INVALID in tokenized.column_names:  # preference rows (data.invalid_pairs: drop)
            for reason in tokenized[INVALID]:
                if reason:
                    reasons[reason] = reasons.get(reason, 0) + 1
            with quiet_datasets():
                tokenized = tokenized.filter(lambda reason: not reason, input_columns=INVALID).remove_columns(INVALID)
            for reason, count in reasons.items():
                log.warning("%s: dropped %d rows: %s", name, count, reason)
        with quiet_datasets():
            kept = tokenized.filter(lambda labels: any(label != IGNORE_INDEX for label in labels), input_columns="labels")
        dropped = len(tokenized) - len(kept)
        if n_truncated:
            log.warning("%s: %d of %d rows truncated to data.max_length=%d", name, n_truncated, len(raw), cfg.max_length)
        if dropped:
            log.warning("%s: dropped %d rows whose response lies beyond data.max_length", name, dropped)
        kept = _draw(kept.remove_columns("truncated"), source, seed + number)
        if dropped:
            reasons["response beyond max_length"] = dropped
        if stats is not None:
            stats.append({"path": name, "rows": len(raw), "truncated": n_truncated, "used": len(kept), "dropped": reasons})
        parts.append(kept)
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(dataset) == 0:
        raise DataError(f"{', '.join(s.path for s in sources)}: no usable rows")
    for finish in {FORMATS[s.format].finish for s in sources} - {None}:  # e.g. KTO's mismatched pairs, over the whole set
        dataset = finish(dataset, cfg.max_length)
    return dataset


def _draw(dataset: datasets.Dataset, source: DataSource, seed: int) -> datasets.Dataset:
    """``samples`` rows (or ``weight`` x the rows): whole passes over the source, then a seeded subset."""
    wanted = source.samples if source.samples is not None else round(source.weight * len(dataset))
    if wanted == len(dataset):
        return dataset
    full, rest = divmod(wanted, len(dataset))
    order = np.random.default_rng(seed).permutation(len(dataset))
    indices = list(range(len(dataset))) * full + sorted(order[:rest].tolist())
    return dataset.select(indices)


def batch_indices(n_rows: int, micro_batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch.

    The shuffle depends only on (seed, epoch), never on the batch size or the world size, so the
    same rows are seen in the same order however they are split: micro-batch 2 with 4 accumulation
    steps sees exactly what micro-batch 8 sees, and a resumed run can skip what it already consumed.
    Batches are dealt round-robin; trailing batches that not every rank would get are dropped so
    that ranks never wait for each other.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=generator).tolist()
    batches = [order[i : i + micro_batch_size] for i in range(0, n_rows, micro_batch_size)]
    usable = len(batches) - len(batches) % world
    return batches[rank:usable:world]
