"""Atomic file writes and the JSONL/CSV readers every stage shares.

Everything the toolkit writes goes to a temporary name in the same folder, is flushed to disk and
then renamed over the target, so a crash or a full disk never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]

# The checkout (or installed tree) this package runs from: data/, configs/ and docs/ are found from here.
REPO_ROOT = Path(__file__).resolve().parents[4]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file should get normal permissions
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise OSError(err.errno, f"disk full while writing {path}; the previous file is untouched") from err
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def atomic_write_jsonl(path: PathLike, records: Iterable[dict]) -> Path:
    buf = io.StringIO()
    for record in records:
        buf.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
    return atomic_write_text(path, buf.getvalue())


def append_jsonl(path: PathLike, record: dict) -> None:
    """Metrics logs are append-only; a torn last line is skipped by `read_jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_jsonl(path: PathLike, skip_torn_tail: bool = True) -> List[dict]:
    """Read JSON lines (gzip allowed). A malformed line is an error naming the file and line,
    except a torn last line of an append-only log, which is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with _open_text(path) as handle:
        lines = handle.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if skip_torn_tail and number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return records


def read_table_rows(path: PathLike) -> List[Tuple[int, dict]]:
    """(line number, record) for each record of a CSV (header row) or JSONL file, gzip allowed, so a
    caller can name the line of a bad value. For CSV the line is where the record starts (a quoted
    field may span lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    name = path.name.removesuffix(".gz")
    rows: List[Tuple[int, dict]] = []
    if name.endswith(".csv"):
        with _open_text(path) as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ValueError(f"{path}: empty file (no header row)")
            previous_end = reader.line_num
            for row in reader:
                rows.append((previous_end + 1, row))
                previous_end = reader.line_num
    elif name.endswith((".jsonl", ".json")):
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
                rows.append((number, record))
    else:
        raise ValueError(f"{path}: expected a .csv or .jsonl file (optionally .gz)")
    return rows


def read_prompts(path: PathLike, column: Optional[str] = None) -> List[str]:
    """Prompts from JSONL (field `prompt`, or `column`), CSV (column `prompt` or `column`) or TXT (a line each)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    field = column or "prompt"
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl") or name.endswith(".json"):
        rows = read_jsonl(path, skip_torn_tail=False)
        missing = [i for i, r in enumerate(rows, 1) if not isinstance(r.get(field), str)]
        if missing:
            raise ValueError(f"{path}: line {missing[0]} has no text field {field!r}")
        prompts = [r[field] for r in rows]
    elif name.endswith(".csv"):
        with _open_text(path) as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or field not in reader.fieldnames:
                raise ValueError(f"{path}: no column {field!r} (columns: {reader.fieldnames})")
            prompts = [row[field] for row in reader]
    else:
        with _open_text(path) as handle:
            prompts = [line.rstrip("\n") for line in handle]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path}: contains no non-empty prompts")
    return prompts
