"""`zoo data prepare`: tokenize a corpus into ArrayRecord shards, in parallel and resumably.

Sources (``--source``):

* ``text``: every file under a directory (recursively, sorted), one document per file; empty files
  and files with a NUL byte in their first 4 KiB (binary) are skipped and counted.
* ``jsonl``: a ``.jsonl`` file or a directory of ``.jsonl`` / ``.jsonl.gz`` files, one document per
  line, the text under ``--text-key``; blank lines are skipped.
* ``tfds``: a TFDS dataset by name (``--tfds-name``) prepared as ``array_record`` in ``--input``
  (the TFDS data_dir; no TensorFlow), the text under ``--text-key``.
* ``hf``: a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``), read directly from its Arrow files with pyarrow; the text under ``--text-key``.

Splits: a text or JSONL document goes to ``validation`` when the hash of its key (the file's
relative path; ``file:byte offset`` for a JSONL line), the first 8 hex digits of its sha1 read as a
fraction (:func:`hash_fraction`), is below ``--validation-fraction`` (default 1%), else to ``train``. When no document
falls below it, the one with the smallest hash goes to ``validation`` (if at least two documents
remain), so a small corpus still gets a validation split of one document. ``--splits
train=DIR,validation=DIR`` instead takes each split from paths under ``--input`` (directories or
files; every file must lie under one of them). TFDS and HF sources keep their own splits: ``train``
from the source's ``train``, ``validation`` from its ``validation`` / ``valid`` / ``dev`` / ``test``
(the first present); a source with only ``train`` is split by the hash of ``split/index`` as above.
``--splits train=train,validation=test`` sets the mapping explicitly.

The work is a list of units (contiguous ranges of the source's documents: ``--shard-mb`` of input
per text/JSONL unit, ``--docs-per-shard`` records per TFDS/HF unit), written to ``plan.json``
first. Each unit is tokenized by a worker process (``--workers``, spawn context) into one shard per
split, written under a temporary name and renamed, then committed by ``work/unit-NNNNN.json`` with
the shards' sha256. A rerun (after a kill, or to check a finished directory) verifies every
committed unit by checksum and redoes only the missing or damaged ones; ``manifest.json`` is
written last. An output directory that holds a different plan is refused. The shard format is in
:mod:`zoo.data.shards` and ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from zoo.data import shards as sh
from zoo.data.tokenizers import Tokenizer, file_sha256, from_spec, load_tokenizer

SOURCES = ("text", "jsonl", "tfds", "hf")
VALIDATION_NAMES = ("validation", "valid", "dev", "test")
TMP = ".tmp"
_TOKENIZE_BATCH = 64


def hash_fraction(key: str) -> float:
    """A document key's place in [0, 1), uniform over keys, from the first 8 hex digits x of its sha1.

    The first decimal digit is x mod 10, the rest x // 10: a fraction of 0.1 selects x mod 10 == 0,
    the validation split of the in-memory text source (`zoo.data.text`), so both agree there.
    """
    x = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return (x % 10 + (x // 10) / (2**32 // 10 + 1)) / 10


def path_splits(splits: str, root: str) -> list[tuple[str, str]]:
    """``[(relative path, 'train' | 'validation')]`` from ``--splits train=DIR,validation=DIR`` of a
    text or JSONL directory (``""``: ``[]``, every document split by hash)."""
    if not splits:
        return []
    out = []
    for item in splits.split(","):
        split, sep, rel = item.partition("=")
        rel = os.path.normpath(rel.strip())
        if not sep or split not in sh.SPLITS or rel.startswith("..") or os.path.isabs(rel):
            raise ValueError(
                f"--splits item {item!r}: write train=PATH,validation=PATH with paths inside --input "
                "(or leave --splits out to split by --validation-fraction)"
            )
        if not os.path.exists(os.path.join(root, rel)):
            raise ValueError(f"--splits item {item!r}: {os.path.join(root, rel)!r} does not exist")
        out.append((rel, split))
    return out


def _split_of_path(rel: str, mapping: list[tuple[str, str]]) -> str | None:
    """The split of file ``rel`` under ``--splits`` paths (None: no mapping, split by hash)."""
    if not mapping:
        return None
    for prefix, split in mapping:
        if prefix == "." or rel == prefix or rel.startswith(prefix + os.sep):
            return split
    raise ValueError(
        f"--splits: {rel!r} lies under none of {[p for p, _ in mapping]}; move it there or name its directory"
    )


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}{TMP}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --- planning: the source's documents as a list of units -------------------------------------------------------


def _group(items: list, sizes: list[int], budget: int) -> list[list]:
    """Consecutive items grouped until each group holds at least ``budget`` (the last may hold less)."""
    groups, cur, total = [], [], 0
    for item, size in zip(items, sizes):
        cur.append(item)
        total += size
        if total >= budget:
            groups.append(cur)
            cur, total = [], 0
    if cur:
        groups.append(cur)
    return groups


def plan_text(path: str, shard_bytes: int, splits: str = "") -> tuple[dict, list[dict]]:
    """Units of ~``shard_bytes`` of files under ``path``, each file with its ``--splits`` split (None: by hash)."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"--input {path!r} is not a directory; point --source text at a folder of text files")
    root = os.path.abspath(path)
    mapping = path_splits(splits, root)
    files, sizes = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(dirnames)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                rel = os.path.relpath(full, root)
                files.append([rel, _split_of_path(rel, mapping)])
                sizes.append(os.path.getsize(full))
    if not files:
        raise ValueError(f"--input {path!r} holds no files; give a directory of text files")
    units = [{"files": g} for g in _group(files, sizes, shard_bytes)]
    return {"kind": "text", "path": root, "files": len(files), "bytes": int(sum(sizes))}, units


def plan_jsonl(path: str, text_key: str, shard_bytes: int, splits: str = "") -> tuple[dict, list[dict]]:
    """Byte ranges of ~``shard_bytes`` of the JSONL files (a ``.gz`` file is one unit), each with the
    file's ``--splits`` split (None: each line by hash)."""
    if not path or not os.path.exists(path):
        raise ValueError(f"--input {path!r} does not exist; give a .jsonl file or a directory of them")
    if os.path.isfile(path):
        if splits:
            raise ValueError(
                f"--splits needs --input to be a directory holding the split files; {path!r} is one file "
                "(leave --splits out to split it by --validation-fraction)"
            )
        root, rels = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    else:
        root, rels = os.path.abspath(path), []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(dirnames)
            rels += [
                os.path.relpath(os.path.join(dirpath, f), root)
                for f in sorted(filenames)
                if f.endswith((".jsonl", ".jsonl.gz"))
            ]
    if not rels:
        raise ValueError(f"--input {path!r} holds no .jsonl or .jsonl.gz files")
    mapping = path_splits(splits, root)
    units, total = [], 0
    for rel in rels:
        size = os.path.getsize(os.path.join(root, rel))
        total += size
        split = _split_of_path(rel, mapping)
        if rel.endswith(".gz"):
            units.append({"file": rel, "start": 0, "end": -1, "split": split})
            continue
        for start in range(0, max(size, 1), shard_bytes):
            units.append({"file": rel, "start": start, "end": min(start + shard_bytes, size), "split": split})
    desc = {"kind": "jsonl", "path": os.path.abspath(path), "text_key": text_key, "files": len(rels), "bytes": total}
    return desc, units


def _fingerprint(desc: dict, units: list[dict]) -> str:
    """SHA-256 over (file, size, mtime) of a text or JSONL input's files: an input edited in place,
    even at the same size, makes another plan, so its old shards are never reused."""
    rels = sorted({f[0] for u in units for f in u.get("files", [])} | {u["file"] for u in units if "file" in u})
    h = hashlib.sha256()
    for rel in rels:
        full = os.path.join(desc["path"], rel) if os.path.isdir(desc["path"]) else desc["path"]
        st = os.stat(full)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def split_mapping(splits: str, available: list[str]) -> dict[str, str]:
    """``{source split: 'train' | 'validation' | 'hash'}`` from ``--splits`` or the automatic rule."""
    if splits:
        mapping = {}
        for item in splits.split(","):
            out, sep, src = item.partition("=")
            if not sep or out not in sh.SPLITS or src not in available:
                raise ValueError(
                    f"--splits item {item!r} must be train=<split> or validation=<split> with a split "
                    f"of the source {available}"
                )
            mapping[src] = out
        return mapping
    if "train" not in available:
        raise ValueError(f"the source has no 'train' split (splits: {available}); pass --splits train=<split>,...")
    valid = next((s for s in VALIDATION_NAMES if s in available), None)
    return {"train": "train", valid: "validation"} if valid else {"train": "hash"}


def _ranges(n: int, per: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


def plan_tfds(name: str, data_dir: str, text_key: str, splits: str, docs_per_shard: int) -> tuple[dict, list[dict]]:
    """Record ranges of ``docs_per_shard`` of each mapped TFDS split."""
    if not name:
        raise ValueError("--source tfds needs --tfds-name (a dataset prepared with file_format='array_record')")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError("--source tfds needs tensorflow-datasets: pip install 'longcontext-zoo[tfds]'") from e
    try:
        info_splits = tfds.builder(name, data_dir=data_dir or None).info.splits
        counts = {s: int(info_splits[s].num_examples) for s in info_splits}
    except Exception as e:  # TFDS raises many types; one clear line for the user
        raise ValueError(
            f"cannot open TFDS dataset {name!r} in {data_dir or 'the default data_dir'}: "
            f"{type(e).__name__}; prepare it with file_format='array_record' first"
        ) from e
    mapping = split_mapping(splits, sorted(counts))
    units = [
        {"split": src, "lo": lo, "hi": hi, "out": out}
        for src, out in mapping.items()
        for lo, hi in _ranges(counts[src], docs_per_shard)
    ]
    if not units:
        raise ValueError(f"TFDS dataset {name!r} has no records in splits {sorted(mapping)}")
    desc = {
        "kind": "tfds",
        "name": name,
        "data_dir": os.path.abspath(data_dir) if data_dir else "",
        "text_key": text_key,
        "splits": mapping,
    }
    return desc, units


def _open_arrow(path: str):
    """Record batches of an Arrow IPC file written by ``datasets`` (stream format; file format also read)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ValueError("--source hf needs pyarrow: pip install 'longcontext-zoo[hf-datasets]'") from e

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
        return iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))


def _hf_split_files(root: str) -> dict[str, list[str]]:
    """``{split: [arrow files relative to root]}`` of a ``save_to_disk`` directory."""

    def files(rel_dir: str) -> list[str]:
        with open(os.path.join(root, rel_dir, "state.json")) as f:
            state = json.load(f)
        if state.get("_indices_data_files"):
            raise ValueError(
                f"{os.path.join(root, rel_dir)!r} holds an indices mapping; call .flatten_indices() before save_to_disk"
            )
        return [os.path.normpath(os.path.join(rel_dir, d["filename"])) for d in state["_data_files"]]

    if os.path.isfile(os.path.join(root, "dataset_dict.json")):
        with open(os.path.join(root, "dataset_dict.json")) as f:
            return {s: files(s) for s in json.load(f)["splits"]}
    if os.path.isfile(os.path.join(root, "state.json")):
        return {"train": files(".")}
    raise ValueError(
        f"--input {root!r} is not a Hugging Face datasets directory (no dataset_dict.json or state.json "
        "from save_to_disk)"
    )


def plan_hf(path: str, text_key: str, splits: str, docs_per_shard: int) -> tuple[dict, list[dict]]:
    """Row ranges of ``docs_per_shard`` of each Arrow file of each mapped split."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"--input {path!r} is not a directory; give the directory written by Dataset.save_to_disk")
    root = os.path.abspath(path)
    split_files = _hf_split_files(root)
    mapping = split_mapping(splits, sorted(split_files))
    units = []
    for src, out in mapping.items():
        for rel in split_files[src]:
            batches = _open_arrow(os.path.join(root, rel))
            first = next(batches, None)
            if first is not None and text_key not in first.schema.names:
                raise ValueError(f"{rel} has no column {text_key!r} (columns: {first.schema.names}); pass --text-key")
            rows = (first.num_rows if first is not None else 0) + sum(b.num_rows for b in batches)
            units += [
                {"split": src, "file": rel, "lo": lo, "hi": hi, "out": out} for lo, hi in _ranges(rows, docs_per_shard)
            ]
    if not units:
        raise ValueError(f"--input {path!r} has no rows in splits {sorted(mapping)}")
    return {"kind": "hf", "path": root, "text_key": text_key, "splits": mapping}, units


# --- workers: one unit -> one shard per split ------------------------------------------------------------------


def _text_documents(desc: dict, unit: dict, skipped: dict) -> Iterator[tuple[str | None, str, bytes | str]]:
    for rel, split in unit["files"]:
        with open(os.path.join(desc["path"], rel), "rb") as f:
            data = f.read()
        if not data:
            skipped["empty"] += 1
        elif b"\0" in data[:4096]:
            skipped["binary"] += 1
        else:
            yield split, rel, data


def _jsonl_lines(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` of the lines whose first byte lies in ``[start, end)`` (``end < 0``: to EOF)."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            pos = 0
            for line in f:
                yield pos, line
                pos += len(line)
        return
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous unit
        pos = f.tell()
        while end < 0 or pos < end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _jsonl_documents(desc: dict, unit: dict, skipped: dict) -> Iterator[tuple[str | None, str, str]]:
    key = desc["text_key"]
    path = os.path.join(desc["path"], unit["file"]) if os.path.isdir(desc["path"]) else desc["path"]
    for pos, line in _jsonl_lines(path, unit["start"], unit["end"]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text; a binary file?"
            raise ValueError(f"{path}: byte {pos}: not valid JSON ({why}); fix the line") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: byte {pos}: no string field {key!r} (fields: {fields}); pass --text-key")
        if not obj[key]:
            skipped["empty"] += 1
            continue
        yield unit.get("split"), f"{unit['file']}:{pos}", obj[key]


_TFDS_SOURCES: dict = {}


def _tfds_documents(desc: dict, unit: dict, skipped: dict) -> Iterator[tuple[str | None, str, bytes | str]]:
    import tensorflow_datasets as tfds

    cache_key = (desc["name"], desc["data_dir"], unit["split"])
    if cache_key not in _TFDS_SOURCES:
        _TFDS_SOURCES.clear()
        _TFDS_SOURCES[cache_key] = tfds.data_source(
            desc["name"], split=unit["split"], data_dir=desc["data_dir"] or None
        )
    source = _TFDS_SOURCES[cache_key]
    for i in range(unit["lo"], unit["hi"]):
        record = source[i]
        if desc["text_key"] not in record:
            raise ValueError(
                f"TFDS record has no field {desc['text_key']!r} (fields: {sorted(record)}); pass --text-key"
            )
        value = record[desc["text_key"]]
        if not isinstance(value, (bytes, str)):
            raise ValueError(
                f"TFDS field {desc['text_key']!r} holds {type(value).__name__}, not text; "
                "pass --text-key naming a Text feature"
            )
        if not value:
            skipped["empty"] += 1
            continue
        yield (None if unit["out"] == "hash" else unit["out"]), f"{unit['split']}/{i}", value


def _hf_documents(desc: dict, unit: dict, skipped: dict) -> Iterator[tuple[str | None, str, str]]:
    pos = 0
    for batch in _open_arrow(os.path.join(desc["path"], unit["file"])):
        lo, hi = max(unit["lo"] - pos, 0), min(unit["hi"] - pos, batch.num_rows)
        if lo < hi:
            for j, value in enumerate(batch.column(desc["text_key"]).slice(lo, hi - lo).to_pylist()):
                if not value:
                    skipped["empty"] += 1
                    continue
                out = None if unit["out"] == "hash" else unit["out"]
                yield out, f"{unit['split']}/{pos + lo + j}", value
        pos += batch.num_rows
        if pos >= unit["hi"]:
            break


_READERS: dict[str, Callable] = {
    "text": _text_documents,
    "jsonl": _jsonl_documents,
    "tfds": _tfds_documents,
    "hf": _hf_documents,
}
_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: dict) -> Tokenizer:
    key = json.dumps(spec, sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = from_spec(spec)
    return _TOKENIZERS[key]


def _tokenized(tok: Tokenizer, docs: Iterator[tuple]) -> Iterator[tuple[str | None, str, np.ndarray]]:
    """``(split, key, int32 tokens)`` per document, tokenized in small batches when the tokenizer can."""
    batch_fn = getattr(tok, "encode_batch", None)
    if batch_fn is None:
        for split, key, text in docs:
            yield split, key, tok.encode(text)
        return
    pending: list = []
    for item in docs:
        pending.append(item)
        if len(pending) == _TOKENIZE_BATCH:
            yield from ((s, k, t) for (s, k, _), t in zip(pending, batch_fn([t for _, _, t in pending])))
            pending = []
    if pending:
        yield from ((s, k, t) for (s, k, _), t in zip(pending, batch_fn([t for _, _, t in pending])))


def unit_paths(index: int, split: str) -> tuple[str, str]:
    """(shard, lengths) paths of unit ``index``'s ``split``, relative to the output directory."""
    return f"{split}/shard-{index:05d}.arrayrecord", f"work/unit-{index:05d}.{split}.lengths.npy"


def _commit_path(out: str, index: int) -> str:
    return os.path.join(out, "work", f"unit-{index:05d}.json")


def process_unit(task: tuple) -> dict:
    """Tokenizes one unit into one shard per split and commits it; returns the commit record.

    A document without a fixed split goes to ``validation`` when its key's :func:`hash_fraction` is
    below the source's ``validation_fraction`` or it is the unit's forced key. The commit records the
    smallest ``[hash_fraction, key]`` of the documents so split to ``train`` (``hash_min``), from which
    :func:`prepare` picks the one document a validation split that came out empty gets.

    Args:
        task: ``(output dir, unit index, source description, unit, tokenizer spec, record_tokens[,
            forced validation key])``.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out, index, desc, unit, tok_spec, record_tokens, *rest = task
    forced = rest[0] if rest else None
    fraction = desc.get("validation_fraction", 0.0)
    tok = _tokenizer(tok_spec)
    skipped = {"empty": 0, "binary": 0}
    writers, lengths, records, tmp = {}, {}, {}, {}
    hash_min = None
    for split, key, tokens in _tokenized(tok, _READERS[desc["kind"]](desc, unit, skipped)):
        if len(tokens) == 0:
            skipped["empty"] += 1
            continue
        if split is None:
            u = hash_fraction(key)
            split = "validation" if u < fraction or key == forced else "train"
            if split == "train" and (hash_min is None or [u, key] < hash_min):
                hash_min = [u, key]
        if split not in writers:
            tmp[split] = os.path.join(out, f"{unit_paths(index, split)[0]}{TMP}.{os.getpid()}")
            writers[split] = ArrayRecordWriter(tmp[split], sh.WRITER_OPTIONS)
            lengths[split], records[split] = [], 0
        for record in sh.encode_records(tokens, record_tokens):
            writers[split].write(record)
            records[split] += 1
        lengths[split].append(len(tokens))
    commit = {"unit": index, "skipped": skipped, "splits": {}, "hash_min": hash_min, "forced_validation": forced}
    for split, writer in writers.items():
        writer.close()
        shard, lengths_file = unit_paths(index, split)
        os.replace(tmp[split], os.path.join(out, shard))
        arr = np.asarray(lengths[split], np.int64)  # [documents of this unit in split]
        ltmp = os.path.join(out, f"{lengths_file}{TMP}.{os.getpid()}.npy")
        np.save(ltmp, arr)
        os.replace(ltmp, os.path.join(out, lengths_file))
        commit["splits"][split] = {
            "path": shard,
            "documents": len(arr),
            "records": records[split],
            "tokens": int(arr.sum()),
            "sha256": file_sha256(os.path.join(out, shard)),
            "lengths": lengths_file,
            "lengths_sha256": file_sha256(os.path.join(out, lengths_file)),
        }
    _write_json_atomic(_commit_path(out, index), commit)
    return commit


def _verified_commit(out: str, index: int) -> dict | None:
    """Unit ``index``'s commit record if it exists and every file it names matches its sha256."""
    path = _commit_path(out, index)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            commit = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    for entry in commit.get("splits", {}).values():
        for key, sha in (("path", "sha256"), ("lengths", "lengths_sha256")):
            file = os.path.join(out, entry[key])
            if not os.path.isfile(file) or file_sha256(file) != entry[sha]:
                return None
    return commit


def _remove_unit(out: str, index: int) -> None:
    for split in sh.SPLITS:
        for rel in unit_paths(index, split):
            if os.path.exists(os.path.join(out, rel)):
                os.remove(os.path.join(out, rel))
    if os.path.exists(_commit_path(out, index)):
        os.remove(_commit_path(out, index))


# --- the driver ------------------------------------------------------------------------------------------------


def _check_output(out: str, plan: dict) -> None:
    """Refuses an output directory that holds something other than this plan's (partial) preparation."""
    plan_file = os.path.join(out, sh.PLAN)
    if os.path.isfile(plan_file):
        with open(plan_file) as f:
            old = json.load(f)
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            changed = "; the input files changed since" if "source" in diff else ""
            raise ValueError(
                f"--output {out!r} holds a different preparation (differs in {', '.join(diff)}{changed}); choose "
                "a new directory or delete that one"
            )
        return
    if os.path.isfile(os.path.join(out, sh.MANIFEST)):
        raise ValueError(f"--output {out!r} holds a manifest without {sh.PLAN}; choose a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(
            f"--output {out!r} is not empty and holds no zoo preparation; choose an empty or new directory"
        )


def _clean_temporaries(out: str) -> None:
    for sub in (*sh.SPLITS, "work", "."):
        folder = os.path.join(out, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if f"{TMP}." in name:
                    os.remove(os.path.join(folder, name))


def _write_lengths(out: str, split: str, commits: list[dict]) -> tuple[str, str, int]:
    """Concatenates the units' lengths of ``split`` into ``split/lengths.npy``; returns (path, sha256, count)."""
    entries = [c["splits"][split] for c in commits if split in c["splits"]]
    n = sum(e["documents"] for e in entries)
    rel = f"{split}/lengths.npy"
    tmp = os.path.join(out, f"{split}/lengths{TMP}.{os.getpid()}.npy")
    os.makedirs(os.path.join(out, split), exist_ok=True)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n,))  # [documents]
    pos = 0
    for e in entries:
        part = np.load(os.path.join(out, e["lengths"]))
        arr[pos : pos + len(part)] = part
        pos += len(part)
    arr.flush()
    del arr
    os.replace(tmp, os.path.join(out, rel))
    return rel, file_sha256(os.path.join(out, rel)), n


def prepare(
    source: str,
    input_path: str,
    output: str,
    *,
    tokenizer: str = "bytes",
    eos_token: str | None = None,
    tfds_name: str = "",
    text_key: str = "text",
    splits: str = "",
    validation_fraction: float = 0.01,
    workers: int = 1,
    shard_mb: float = 64.0,
    docs_per_shard: int = 4096,
    record_tokens: int = 65536,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenizes a corpus into ArrayRecord shards in ``output``; resumes an interrupted run.

    Args:
        source: one of :data:`SOURCES`.
        input_path: text directory, JSONL file/directory, TFDS data_dir (``""``: TFDS's default) or
            Hugging Face ``save_to_disk`` directory.
        output: the prepared directory (created; must be new, empty, or an earlier run of the same plan).
        tokenizer: ``"bytes"``, a SentencePiece ``.model`` or a ``tokenizer.json`` path.
        eos_token: the end-of-document token of a ``tokenizer.json`` (default: guessed, see tokenizers).
        tfds_name: the TFDS dataset name (``source="tfds"``).
        text_key: the text field of JSONL lines, TFDS records and HF rows.
        splits: ``"train=<split>,validation=<split>"`` for TFDS/HF sources, ``"train=PATH,validation=PATH"``
            (paths inside ``input_path``) for text/JSONL; ``""``: automatic.
        validation_fraction: the share of documents split by hash that go to ``validation`` (at
            least one document when the corpus holds two or more).
        workers: worker processes (spawn); 1 runs in this process.
        shard_mb: MiB of input per text/JSONL unit (one shard per split per unit).
        docs_per_shard: records of the source per TFDS/HF unit.
        record_tokens: tokens per ArrayRecord record (longer documents span several records).
        log: called with one progress line per unit (``None``: silent).

    Returns:
        The manifest (also written to ``output/manifest.json``).
    """
    if source not in SOURCES:
        raise ValueError(f"--source {source!r} is unknown; choose one of {SOURCES}")
    for name, value, low in (
        ("--workers", workers, 1),
        ("--docs-per-shard", docs_per_shard, 1),
        ("--record-tokens", record_tokens, 1),
    ):
        if int(value) < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if not shard_mb > 0:
        raise ValueError(f"--shard-mb {shard_mb} must be > 0")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"--validation-fraction {validation_fraction} must be in [0, 1), e.g. 0.01")
    if not output:
        raise ValueError("--output is required: the directory to write the shards to")
    tok = load_tokenizer(tokenizer, eos_token)
    shard_bytes = max(1, int(shard_mb * 2**20))
    if source == "text":
        desc, units = plan_text(input_path, shard_bytes, splits)
    elif source == "jsonl":
        desc, units = plan_jsonl(input_path, text_key, shard_bytes, splits)
    elif source == "tfds":
        desc, units = plan_tfds(tfds_name, input_path, text_key, splits, docs_per_shard)
    else:
        desc, units = plan_hf(input_path, text_key, splits, docs_per_shard)
    desc["validation_fraction"] = float(validation_fraction)
    if desc["kind"] in ("text", "jsonl"):
        desc["fingerprint"] = _fingerprint(desc, units)
    plan = {
        "format": sh.FORMAT,
        "format_version": sh.FORMAT_VERSION,
        "tokenizer": tok.spec(),
        "source": desc,
        "record_tokens": int(record_tokens),
        "units": units,
    }
    out = os.path.abspath(output)
    _check_output(out, plan)
    for sub in (*sh.SPLITS, "work"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    _write_json_atomic(os.path.join(out, sh.PLAN), plan)
    _clean_temporaries(out)

    commits: dict[int, dict] = {}
    for i in range(len(units)):
        commit = _verified_commit(out, i)
        if commit is not None:
            commits[i] = commit
        else:
            _remove_unit(out, i)
    pending = [i for i in range(len(units)) if i not in commits]
    if log and commits:
        log(f"{len(commits)} of {len(units)} units already prepared (checksums verified)")
    tasks = [(out, i, desc, units[i], plan["tokenizer"], int(record_tokens)) for i in pending]
    if workers == 1 or len(tasks) <= 1:
        results = map(process_unit, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(process_unit, tasks)
    try:
        for commit in results:
            commits[commit["unit"]] = commit
            if log:
                docs = sum(e["documents"] for e in commit["splits"].values())
                log(f"unit {commit['unit'] + 1}/{len(units)}: {docs:,} documents ({len(commits)}/{len(units)} done)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    forced = _one_validation_document(commits) if validation_fraction > 0 else None
    if forced is not None:  # no document fell below the fraction: the smallest hash is validation
        i, key = forced
        _remove_unit(out, i)
        commits[i] = process_unit((out, i, desc, units[i], plan["tokenizer"], int(record_tokens), key))
        if log:
            log(f"unit {i + 1}/{len(units)}: {key!r} moved to validation (no document fell below the fraction)")

    ordered = [commits[i] for i in range(len(units))]
    skipped = {k: sum(c["skipped"][k] for c in ordered) for k in ("empty", "binary")}
    split_info = {}
    for split in sh.SPLITS:
        rel, sha, n = _write_lengths(out, split, ordered)
        entries = [c["splits"][split] for c in ordered if split in c["splits"]]
        split_info[split] = {
            "documents": n,
            "tokens": sum(e["tokens"] for e in entries),
            "lengths": rel,
            "lengths_sha256": sha,
            "shards": [{k: e[k] for k in ("path", "documents", "records", "tokens", "sha256")} for e in entries],
        }
    documents = sum(s["documents"] for s in split_info.values())
    if documents == 0:
        raise ValueError(
            f"--input {input_path!r} yielded no non-empty documents (skipped: {skipped}); check the "
            "source and --text-key"
        )
    manifest = {
        "format": sh.FORMAT,
        "format_version": sh.FORMAT_VERSION,
        "created_by": "zoo data prepare",
        "record": {
            "dtype": sh.RECORD_DTYPE,
            "layout": "ceil(n / record_tokens) records per document, each the raw "
            "little-endian int32 token ids of up to record_tokens tokens, in document order; no header",
        },
        "record_tokens": int(record_tokens),
        "writer_options": sh.WRITER_OPTIONS,
        "tokenizer": plan["tokenizer"],
        "source": desc,
        "units": len(units),
        "documents": documents,
        "tokens": sum(s["tokens"] for s in split_info.values()),
        "skipped": skipped,
        "splits": split_info,
        "plan_sha256": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
    }
    _write_json_atomic(os.path.join(out, sh.MANIFEST), manifest)
    return manifest


def _one_validation_document(commits: dict[int, dict]) -> tuple[int, str] | None:
    """``(unit, key)`` of the hash-split document to move to ``validation`` when that split is empty
    and at least two hash-split documents exist; None otherwise."""
    if any("validation" in c["splits"] for c in commits.values()):
        return None
    candidates = [(c["hash_min"], i) for i, c in commits.items() if c.get("hash_min")]
    train_docs = sum(c["splits"].get("train", {}).get("documents", 0) for c in commits.values())
    if not candidates or train_docs < 2:
        return None
    (_, key), i = min(candidates)
    return i, key


def run(args: argparse.Namespace) -> int:
    """Runs ``zoo data prepare`` from its parsed arguments (`zoo.cli`); prints a summary; returns 0.

    Bad input (a ValueError) into a new or empty ``--output`` leaves nothing behind, so the corrected
    command starts afresh; an interrupted run keeps its units for the rerun to resume."""
    out = os.path.abspath(args.output) if args.output else ""
    existed = bool(out) and os.path.isdir(out)
    fresh = bool(out) and (not existed or not os.listdir(out))
    try:
        manifest = _prepare_from_args(args)
    except ValueError:
        if fresh:
            _remove_preparation(out, existed)
        raise
    print(summary(manifest, args.output))
    return 0


def _remove_preparation(out: str, keep_dir: bool) -> None:
    """Removes what a failed preparation wrote into a directory that was new or empty."""
    import shutil

    if not keep_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in (*sh.SPLITS, "work", sh.PLAN, sh.MANIFEST):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def _prepare_from_args(args: argparse.Namespace) -> dict:
    return prepare(
        args.source,
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        tfds_name=args.tfds_name,
        text_key=args.text_key,
        splits=args.splits,
        validation_fraction=args.validation_fraction,
        workers=args.workers,
        shard_mb=args.shard_mb,
        docs_per_shard=args.docs_per_shard,
        record_tokens=args.record_tokens,
        log=print,
    )


def summary(manifest: dict, output: str) -> str:
    """A few lines: where, which tokenizer, documents and tokens per split, skipped files."""
    from zoo.data.tokenizers import describe_spec

    lines = [
        f"prepared {output}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens",
        f"tokenizer {describe_spec(manifest['tokenizer'])}",
    ]
    for split, info in manifest["splits"].items():
        lines.append(
            f"  {split:<10} {info['documents']:>12,} documents {info['tokens']:>16,} tokens "
            f"{len(info['shards']):>5} shards"
        )
    if any(manifest["skipped"].values()):
        lines.append(f"skipped: {manifest['skipped']['empty']:,} empty, {manifest['skipped']['binary']:,} binary")
    lines.append(f"train on it: --config.data.source=shards --config.data.path={output}")
    return "\n".join(lines)
