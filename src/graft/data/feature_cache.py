"""A durable cache of a frozen module's outputs per example (bottleneck features).

Training a small head over a frozen backbone recomputes the same backbone outputs every
epoch and every run. ``FeatureCache`` computes each one once and keeps it on disk, keyed by

    (module digest, signature, output, parameter dtype, sha256 of the example's content)

so a changed image is recomputed and an unchanged one never is, and two modules never share
entries. Layout of the cache folder:

    index.sqlite                 entries: key -> (shard, row); shards: digest, rows
    shards/<sha256>.safetensors  a (rows, ...) tensor "features"; the metadata repeats the
                                 keys, so a lost index is rebuilt from the shards
    shards/.<name>.<uuid>.tmp    a shard being written (graft._fs.atomic_write)

Shards are written atomically (temp file, fsync, rename) and named by their sha256, which is
checked on every read: a damaged shard is dropped and its entries recomputed, never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from graft._sqlite import transaction
from graft.errors import DataError, StoreError, TrainingError
from graft._fs import atomic_write, sha256_bytes, sha256_file
from graft.data.collation import module_collate, signature_of
from graft.data.fingerprints import example_sha256
from graft.data.labels import classes_of, labels_of

__all__ = ["CachedFeatures", "FeatureCache"]

_FORMAT = "graft.feature-cache/1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    sha256 TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    module TEXT NOT NULL,
    signature TEXT NOT NULL,
    output TEXT NOT NULL,
    dtype TEXT NOT NULL,
    content TEXT NOT NULL,
    shard TEXT NOT NULL REFERENCES shards(sha256),
    row INTEGER NOT NULL,
    PRIMARY KEY (module, signature, output, dtype, content)
);
CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard);
"""


class CachedFeatures(Dataset):
    """A dataset of ``(feature, label)`` pairs, for training a head over cached features.

    Args:
        features: ``(N, ...)`` one feature tensor per example.
        labels: ``(N,)`` int class indices.
        classes: The class names (``None``: ``'0'`` up to the largest label).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor | Sequence[int],
                 classes: Sequence[str] | None = None) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if features.shape[0] != labels.shape[0]:
            raise DataError(f"CachedFeatures got {features.shape[0]} features but "
                            f"{labels.shape[0]} labels")
        self.features = features
        self.label_tensor = labels
        self.labels: list[int] = labels.tolist()
        self.classes: list[str] = (list(classes) if classes is not None else
                                   [str(i) for i in range(max(self.labels, default=-1) + 1)])

    @property
    def dim(self) -> int:
        """The size of one flattened feature vector."""
        return int(self.features[0].numel()) if len(self) else 0

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.labels[index]

    def __repr__(self) -> str:
        shape = tuple(self.features.shape)
        return f"CachedFeatures(features={shape}, classes={self.classes})"


class FeatureCache:
    """Outputs of frozen module signatures per example, computed once, kept on disk.

    Args:
        directory: The cache folder (created if missing). Several processes may share it.
        shard_size: Entries per shard file written.
        workers: Threads that load and preprocess examples (``None``: up to 8).

    Example:
        >>> cache = graft.FeatureCache("~/.cache/my-features")
        >>> x, y = cache.features(backbone, "features", graft.data.ImageFolder("photos"))
    """

    def __init__(self, directory: str | os.PathLike[str], *, shard_size: int = 4096,
                 workers: int | None = None) -> None:
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory).expanduser()
        self.shard_size = shard_size
        self.workers = min(8, os.cpu_count() or 1) if workers is None else max(1, workers)
        self.computed = 0  # examples run through a module by this object, for inspection
        try:
            for sub in ("shards",):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the feature cache folder {self.directory} "
                             f"({exc})") from None
        self._open_index()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r})"

    def __len__(self) -> int:
        with self._db() as conn:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    # -- the public operation --------------------------------------------------------------

    def features(self, module: Any, signature: str | None, dataset: Dataset, batch_size: int = 64,
                 progress: bool = True, *,
                 output: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every example's output of ``module``'s ``signature``, from the cache where it is.

        Missing entries are computed in batches (eval mode, no gradients, the signature's own
        preprocessing), stored, and returned with the cached ones, in dataset order. A second
        call over the same module and data runs no forward pass.

        Args:
            module: A frozen ``graft.Module`` (``trainable=False``), or a signature view.
            signature: The signature's name (``None``: the view's, or the default).
            dataset: Items ``(example, label)``: raw examples the signature preprocesses, or
                tensors.
            batch_size: Examples per forward pass.
            progress: Show a progress bar while computing.
            output: Which output, for a signature with several.

        Returns:
            ``(features, labels)``: ``(N, ...)`` on the CPU, and int64 ``(N,)``.

        Raises:
            DataError: the dataset is empty, or an example cannot be prepared.
            TrainingError: the module is trainable, so its outputs may change under the key.
        """
        module, name, spec = signature_of(module, signature)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(module, "trainable", False) or any(p.requires_grad
                                                      for p in module.parameters()):
            raise TrainingError(f"module {module.name} is trainable: its weights may change, so "
                                "its outputs cannot be cached under its digest; load it with "
                                "trainable=False to cache features")
        if output is None:
            if len(spec.outputs) != 1:
                raise DataError(f"signature {name!r} has outputs {list(spec.outputs)}; choose "
                                "one with output=...")
            output = next(iter(spec.outputs))
        elif output not in spec.outputs:
            raise DataError(f"signature {name!r} has no output {output!r}; it has "
                            f"{list(spec.outputs)}")
        count = len(dataset)
        if count == 0:
            raise DataError("cannot compute features of an empty dataset")
        labels = torch.tensor(labels_of(dataset), dtype=torch.int64)
        keys = [example_sha256(dataset, i) for i in range(count)]
        first = next(iter(module.parameters()), None)
        where = (module.digest, name, output,
                 str(first.dtype).removeprefix("torch.") if first is not None else "none")

        found = self._lookup(where, set(keys))
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in found and key not in todo:
                todo[key] = i
        if todo:
            found.update(self._compute(module, name, output, where, dataset, todo, batch_size,
                                       progress))
        rows = [found[key] for key in keys]
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise DataError(f"signature {name!r} gave features of different shapes "
                            f"{sorted(shapes)[:3]} for different examples; it cannot be "
                            "cached as one (N, D) tensor")
        return torch.stack(rows), labels

    def dataset(self, module: Any, signature: str | None, dataset: Dataset,
                **kwargs: Any) -> CachedFeatures:
        """``features(...)`` as a ``CachedFeatures`` dataset that keeps ``dataset.classes``."""
        features, labels = self.features(module, signature, dataset, **kwargs)
        return CachedFeatures(features, labels, classes_of(dataset))

    # -- reading ---------------------------------------------------------------------------

    def _lookup(self, where: tuple[str, str, str, str],
                wanted: set[str]) -> dict[str, torch.Tensor]:
        with self._db() as conn:
            hits = conn.execute("SELECT content, shard, row FROM entries WHERE module=? AND "
                                "signature=? AND output=? AND dtype=?", where).fetchall()
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for content, shard, row in hits:
            if content in wanted:
                by_shard.setdefault(shard, []).append((content, row))
        found: dict[str, torch.Tensor] = {}
        for shard, entries in by_shard.items():
            tensor = self._read_shard(shard)
            if tensor is None:
                continue
            for content, row in entries:
                if row < tensor.shape[0]:
                    found[content] = tensor[row]
        return found

    def _read_shard(self, sha: str) -> torch.Tensor | None:
        """A shard's features, or ``None`` (and its entries forgotten) when it is damaged."""
        from safetensors.torch import load

        path = self._shard_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._drop_shard(sha, "the file is missing")
            return None
        if sha256_bytes(data) != sha:
            self._drop_shard(sha, "its sha256 does not match its name (the file is corrupt)")
            return None
        try:
            return load(data)["features"]
        except Exception as exc:  # noqa: BLE001 - unparseable is as bad as corrupt
            self._drop_shard(sha, f"it cannot be parsed ({exc})")
            return None

    def _drop_shard(self, sha: str, reason: str) -> None:
        with self._db() as conn, transaction(conn):
            dropped = conn.execute("DELETE FROM entries WHERE shard=?", (sha,)).rowcount
            conn.execute("DELETE FROM shards WHERE sha256=?", (sha,))
        with contextlib.suppress(FileNotFoundError):
            self._shard_path(sha).unlink()
        warnings.warn(f"feature cache shard {self._shard_path(sha)} is unusable ({reason}); "
                      f"its {dropped} entries are removed and will be recomputed",
                      RuntimeWarning, stacklevel=5)

    # -- computing and writing -------------------------------------------------------------

    def _compute(self, module: Any, name: str, output: str, where: tuple[str, str, str, str],
                 dataset: Dataset, todo: dict[str, int], batch_size: int,
                 progress: bool) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        collate = module_collate(module, name)
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        items = list(todo.items())
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        results: dict[str, torch.Tensor] = {}
        pending: list[tuple[str, torch.Tensor]] = []
        was_training = module.training
        module.eval()
        bar = tqdm(total=len(items), desc=f"features {module.name}.{name}", unit="ex",
                   disable=not progress, leave=False)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="graft-cache") as pool, \
                    ThreadPoolExecutor(1, thread_name_prefix="graft-cache-batch") as loader:
                def load(batch: list[tuple[str, int]]) -> Any:
                    examples = list(pool.map(lambda i: dataset[i][0], [i for _, i in batch]))
                    return collate.inputs(examples, executor=pool)

                # Prepare the next batches while the module runs this one.
                ahead: deque[Future[Any]] = deque()
                queue = iter(batches)
                for batch in queue:
                    ahead.append(loader.submit(load, batch))
                    if len(ahead) == 2:
                        break
                done = 0
                while ahead:
                    inputs = ahead.popleft().result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        ahead.append(loader.submit(load, nxt))
                    batch = batches[done]
                    done += 1
                    out = self._forward(module, name, output, inputs, device, len(batch))
                    self.computed += len(batch)
                    for (key, _), row in zip(batch, out):
                        results[key] = row
                        pending.append((key, row))
                    if len(pending) >= self.shard_size:
                        self._write_shard(where, pending)
                        pending = []
                    bar.update(len(batch))
            if pending:
                self._write_shard(where, pending)
        finally:
            bar.close()
            module.train(was_training)
        return results

    @staticmethod
    def _forward(module: Any, name: str, output: str, inputs: Any, device: torch.device,
                 expected: int) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(inputs, dict):
                out = module.signature(name)(**{k: v.to(device) for k, v in inputs.items()})
            else:
                out = module.signature(name)(inputs.to(device))
        if isinstance(out, dict):
            out = out[output]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"signature {name!r} returned {shape} for a batch of {expected}; "
                            "the feature cache needs one output row per example")
        return out.detach().to("cpu")

    def _write_shard(self, where: tuple[str, str, str, str],
                     entries: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        contents = [key for key, _ in entries]
        tensor = torch.stack([row for _, row in entries]).contiguous()
        module, signature, output, dtype = where
        metadata = {"format": _FORMAT, "module": module, "signature": signature,
                    "output": output, "dtype": dtype, "contents": json.dumps(contents)}
        data = save({"features": tensor}, metadata=metadata)
        sha = sha256_bytes(data)
        path = self._shard_path(sha)
        if not path.exists():
            try:
                atomic_write(path, data)
            except OSError as exc:
                raise StoreError(f"cannot write the feature cache shard {path} ({exc})") \
                    from None
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._db() as conn, transaction(conn):
            conn.execute("INSERT OR IGNORE INTO shards (sha256, rows, created) VALUES (?, ?, ?)",
                         (sha, len(contents), created))
            conn.executemany("INSERT OR REPLACE INTO entries (module, signature, output, dtype, "
                             "content, shard, row) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(*where, key, sha, row) for row, key in enumerate(contents)])

    def _shard_path(self, sha: str) -> Path:
        return self.directory / "shards" / f"{sha}.safetensors"

    # -- the index -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.directory / "index.sqlite", timeout=60,
                               isolation_level=None)
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"the feature cache index {self.directory / 'index.sqlite'} "
                             f"failed ({exc})") from None
        finally:
            conn.close()

    def _open_index(self) -> None:
        path = self.directory / "index.sqlite"
        fresh = not path.exists()
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=60,
                                                    isolation_level=None)) as conn:
                conn.executescript(_SCHEMA)
                conn.execute("SELECT COUNT(*) FROM entries").fetchone()
            if fresh and any((self.directory / "shards").glob("*.safetensors")):
                self._rebuild_index()  # the index was deleted; the shards still hold the keys
            return
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                raise StoreError(f"the feature cache index {path} is locked ({exc})") from None
            aside = path.with_name(f"index.sqlite.corrupt-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(path, aside)
            warnings.warn(f"feature cache index {path} is unreadable ({exc}); moved it to "
                          f"{aside.name} and rebuilt the index from the shards", RuntimeWarning,
                          stacklevel=3)
        with contextlib.closing(sqlite3.connect(path, timeout=60,
                                                isolation_level=None)) as conn:
            conn.executescript(_SCHEMA)
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Re-enter every intact shard's entries (its metadata lists its keys)."""
        from safetensors import safe_open

        for path in sorted((self.directory / "shards").glob("*.safetensors")):
            sha = path.name.removesuffix(".safetensors")
            try:
                if sha256_file(path) != sha:
                    path.unlink()  # damaged: its entries will be recomputed
                    continue
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                where = (meta["module"], meta["signature"], meta["output"], meta["dtype"])
                contents = json.loads(meta["contents"])
            except Exception:  # noqa: BLE001 - a shard that cannot be read is left out
                continue
            if meta.get("format") != _FORMAT:
                continue
            with self._db() as conn, transaction(conn):
                conn.execute("INSERT OR IGNORE INTO shards (sha256, rows, created) "
                             "VALUES (?, ?, ?)", (sha, len(contents), "rebuilt"))
                conn.executemany("INSERT OR IGNORE INTO entries (module, signature, output, "
                                 "dtype, content, shard, row) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(*where, key, sha, row) for row, key in enumerate(contents)])
