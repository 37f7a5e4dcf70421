"""The on-disk cache of encoded training items: each picture's latent, its caption's embedding and its
control, encoded once and streamed from disk by every later run, so a run's memory does not grow with
the number of pictures and a second run (or one with another step count) encodes nothing.

A cache is a folder:

    index.json                 {"format": "controlnext-training-cache", "version": 1,
                                "identity": {...},                # what every tensor depends on
                                "shards": {"<n>": rows, ...},      # rows written in each shard
                                "entries": {"<item key>": {"digest": ..., "shard": n, "row": r}, ...}}
    shards/<n>.safetensors     tensors named "<row>.<name>" (e.g. "17.latent"), one row per item

No pickles. Every file is written to a temporary name and renamed into place (the index after each
shard), so a Cancel or a crash loses at most the shard being filled, and the index never names a
shard that is not complete.
"""
from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from .errors import ControlNeXtError

FORMAT = "controlnext-training-cache"
VERSION = 1
INDEX_FILE = "index.json"
SHARDS_FOLDER = "shards"
_SHARD_FILE = re.compile(r"(\d+)\.safetensors")
_TEMPORARY_PREFIX = ".tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)")


def write_advice(error: BaseException) -> str:
    """What to do about an error writing a file, from its OS error number: an OSError's, or the one
    safetensors names in its message (it raises SafetensorError, not OSError, for a full disk)."""
    number = error.errno if isinstance(error, OSError) else None
    if number is None and (match := _OS_ERROR_NUMBER.search(str(error))):
        number = int(match.group(1))
    if number in _DISK_FULL:
        return "The disk is full (or the file is over a size limit): free some disk space"
    if number in _NOT_WRITABLE:
        return "The folder cannot be written: make it writable"
    return "Check the disk"


class _Entry(NamedTuple):
    digest: str
    shard: int
    row: int


class TrainingCache:
    """A folder of encoded training items: item key (str) -> its tensors (name -> tensor, e.g.
    ``{"latent": [4,h,w], "context": [77,768], "pooled": [1280], "control": [3,H,W]}``), stored with
    the digest of the item's contents so a changed picture or caption is found and re-encoded alone.

    ``identity`` is what the tensors depend on besides the item (the VAE and text encoder, the
    resolution, the family...). A cache whose index holds another identity (or another format
    version) is never read: its entries count as missing, and the next ``writer`` rewrites the index
    with the new identity and deletes the old shards as it starts (opening alone changes nothing).
    A folder that is not a cache (files but no index, or an index.json of something else) is refused,
    never written to.
    One writer at a time: the cache takes no lock.
    """

    def __init__(self, folder: str, identity: Mapping[str, str]):
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in identity.items()):
            raise TypeError(f"a training cache's identity maps str to str, got {dict(identity)!r}")
        self.folder = folder
        self.identity = dict(identity)
        self._entries: dict[str, _Entry] = {}
        self._shard_rows: dict[int, int] = {}  # shard -> rows written in it (live or replaced)
        index = self._read_index()
        if index is not None and index.get("version") == VERSION and index.get("identity") == self.identity:
            self._load(index)

    # --- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def missing(self, items: Mapping[str, str]) -> list[str]:
        """The keys of ``items`` (key -> content digest) to encode: not cached, or cached from other contents."""
        return [key for key, digest in items.items()
                if key not in self._entries or self._entries[key].digest != digest]

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors of these items, stacked along a new first dimension in the order of ``keys``.
        Only their rows are read from the shards (memory-mapped), so a batch costs the same whatever
        the size of the cache."""
        self._check_present(keys)
        batch: dict[str, torch.Tensor] = {}
        for shard, shard_positions in self._positions_by_shard(keys).items():
            with self._open_shard(shard) as file:
                names = _names_by_row(file.keys())
                for position in shard_positions:
                    row = self._entries[keys[position]].row
                    if batch and set(names[row]) != set(batch):
                        raise ControlNeXtError(
                            f"Training cache items {keys[0]!r} and {keys[position]!r} hold different tensors "
                            f"({sorted(batch)} and {sorted(names[row])}): they cannot share a batch.")
                    for name in names[row]:
                        _put(batch, name, position, len(keys), file.get_tensor(f"{row}.{name}"), keys)
        return batch

    def read_rows(self, keys: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Each item's tensors as stored (not stacked: items may differ in shape, say captions of
        other token lengths), in the order of ``keys``; each shard opened once for all its items."""
        self._check_present(keys)
        rows: list[dict[str, torch.Tensor]] = [{} for _ in keys]
        for shard, shard_positions in self._positions_by_shard(keys).items():
            with self._open_shard(shard) as file:
                names = _names_by_row(file.keys())
                for position in shard_positions:
                    row = self._entries[keys[position]].row
                    rows[position] = {name: file.get_tensor(f"{row}.{name}") for name in names[row]}
        return rows

    def size_bytes(self) -> int:
        """The bytes the folder takes on disk (the index, the shards and any leftovers a writer will remove)."""
        total = 0
        for folder in (self.folder, os.path.join(self.folder, SHARDS_FOLDER)):
            if os.path.isdir(folder):
                total += sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())
        return total

    # --- writing ---------------------------------------------------------------------------------

    def writer(self, shard_items: int = 256, shard_bytes: int = 256 << 20) -> CacheWriter:
        """A context manager to ``add`` encoded items; a shard is written as soon as it holds
        ``shard_items`` items or ``shard_bytes`` bytes (what the writer keeps in memory)."""
        if shard_items < 1 or shard_bytes < 1:
            raise ControlNeXtError(f"A cache shard holds at least one item and one byte, got {shard_items} "
                                   f"items and {shard_bytes} bytes.")
        return CacheWriter(self, shard_items, shard_bytes)

    def prune(self, keep: Iterable[str]) -> int:
        """Drops the items not in ``keep`` (pictures gone from the data set) and rewrites the shards
        that hold dropped or replaced rows, so the disk holds only what a run can read. Returns how
        many items were dropped."""
        keep = set(keep)
        dropped = [key for key in self._entries if key not in keep]
        for key in dropped:
            del self._entries[key]
        live = Counter(entry.shard for entry in self._entries.values())
        stale = [shard for shard, rows in self._shard_rows.items() if live[shard] < rows]
        if not stale:
            return len(dropped)
        keys_by_shard: dict[int, list[str]] = {}
        for key, entry in self._entries.items():
            keys_by_shard.setdefault(entry.shard, []).append(key)
        self._begin_writing()
        for shard in stale:
            keys = keys_by_shard.get(shard, [])
            if keys:
                with self._open_shard(shard) as file:
                    names = _names_by_row(file.keys())
                    items = [(key, self._entries[key].digest,
                              {name: file.get_tensor(f"{self._entries[key].row}.{name}")
                               for name in names[self._entries[key].row]}) for key in keys]
                self._write_shard(items)
            del self._shard_rows[shard]
        self._write_index()
        self._remove_unreferenced_files()
        return len(dropped)

    # --- the folder ------------------------------------------------------------------------------

    def _read_index(self) -> dict | None:
        """The folder's index, None for a new or empty folder; refuses a folder that is not a cache."""
        path = os.path.join(self.folder, INDEX_FILE)
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ControlNeXtError(f"{self.folder} is a file, not a folder: name a folder for the training cache.")
        if not os.path.isfile(path):
            if os.path.isdir(self.folder) and os.listdir(self.folder):
                raise ControlNeXtError(
                    f"{self.folder} holds other files and no {INDEX_FILE}: it is not a training cache, and "
                    "the cache writes only into a new or empty folder or an existing cache. Name another folder.")
            return None
        try:
            with open(path, encoding="utf-8") as file:
                index = json.load(file)
        except (OSError, ValueError) as error:
            raise ControlNeXtError(f"{path} cannot be read ({error}): delete the folder {self.folder} "
                                   "and the training cache is built again.") from error
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ControlNeXtError(
                f"{path} is not a training cache's index (no \"format\": \"{FORMAT}\"): the folder holds "
                "something else. Name a new or empty folder for the training cache.")
        return index

    def _load(self, index: dict) -> None:
        """Takes the index's entries, less those whose shard file is gone (they count as missing)."""
        try:
            shard_rows = {int(shard): int(rows) for shard, rows in index["shards"].items()}
            entries = {key: _Entry(str(entry["digest"]), int(entry["shard"]), int(entry["row"]))
                       for key, entry in index["entries"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ControlNeXtError(f"The index of the training cache at {self.folder} is damaged ({error!r}): "
                                   "delete the folder and the cache is built again.") from error
        self._shard_rows = {shard: rows for shard, rows in shard_rows.items()
                            if os.path.isfile(self._shard_path(shard))}
        self._entries = {key: entry for key, entry in entries.items() if entry.shard in self._shard_rows}

    def _shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, SHARDS_FOLDER, f"{shard}.safetensors")

    def _check_present(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ControlNeXtError("No items to read from the training cache: ask for at least one.")
        absent = [key for key in keys if key not in self._entries]
        if absent:
            raise ControlNeXtError(
                f"{len(absent)} item(s) are not in the training cache at {self.folder} (first: {absent[0]!r}): "
                "build the cache for this data set first (missing() names the items to encode).")

    def _positions_by_shard(self, keys: Sequence[str]) -> dict[int, list[int]]:
        """The positions in ``keys`` of the items of each shard."""
        positions: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            positions.setdefault(self._entries[key].shard, []).append(position)
        return positions

    def _open_shard(self, shard: int):
        path = self._shard_path(shard)
        try:
            return safetensors.safe_open(path, framework="pt", device="cpu")
        except (OSError, safetensors.SafetensorError) as error:
            raise ControlNeXtError(f"{path} of the training cache cannot be read ({error}): delete the folder "
                                   f"{self.folder} and the cache is built again.") from error

    def _begin_writing(self) -> None:
        """Makes the folder a cache of this identity before any shard is written, so a Cancel in the
        first shard leaves a cache to continue, and removes what the index does not name (an
        interrupted shard, another identity's shards)."""
        os.makedirs(os.path.join(self.folder, SHARDS_FOLDER), exist_ok=True)
        self._write_index()
        self._remove_unreferenced_files()

    def _write_shard(self, items: Sequence[tuple[str, str, Mapping[str, torch.Tensor]]]) -> None:
        """Writes ``items`` (key, digest, tensors) as a new shard and points their entries at it;
        the index is the caller's to write."""
        numbers = [int(match.group(1)) for name in os.listdir(os.path.join(self.folder, SHARDS_FOLDER))
                   if (match := _SHARD_FILE.fullmatch(name))]
        shard = max([*numbers, *self._shard_rows], default=-1) + 1
        tensors = {f"{row}.{name}": tensor for row, (_, _, item) in enumerate(items) for name, tensor in item.items()}
        _write_atomically(self._shard_path(shard), lambda path: safetensors.torch.save_file(tensors, path))
        self._shard_rows[shard] = len(items)
        for row, (key, digest, _) in enumerate(items):
            self._entries[key] = _Entry(digest, shard, row)

    def _commit_shard(self, items: Sequence[tuple[str, str, Mapping[str, torch.Tensor]]]) -> None:
        """A writer's shard: written, then named in the index; shards left without a live row are removed."""
        self._write_shard(items)
        live = Counter(entry.shard for entry in self._entries.values())
        self._shard_rows = {shard: rows for shard, rows in self._shard_rows.items() if live[shard]}
        self._write_index()
        self._remove_unreferenced_files()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "identity": self.identity,
                 "shards": {str(shard): rows for shard, rows in sorted(self._shard_rows.items())},
                 "entries": {key: entry._asdict() for key, entry in self._entries.items()}}

        def write(path: str) -> None:
            with open(path, "w", encoding="utf-8") as file:
                json.dump(index, file)

        _write_atomically(os.path.join(self.folder, INDEX_FILE), write)

    def _remove_unreferenced_files(self) -> None:
        """Deletes the cache's own files that the index does not name; anything else is left alone."""
        shards_folder = os.path.join(self.folder, SHARDS_FOLDER)
        for folder in (self.folder, shards_folder):
            for name in os.listdir(folder):
                match = _SHARD_FILE.fullmatch(name) if folder == shards_folder else None
                if name.startswith(_TEMPORARY_PREFIX) or (match and int(match.group(1)) not in self._shard_rows):
                    os.remove(os.path.join(folder, name))


class CacheWriter:
    """Adds encoded items to a ``TrainingCache`` (``with cache.writer() as writer: writer.add(...)``).
    Leaving the ``with`` normally writes the last shard; leaving it by an exception (Cancel, a failed
    encode) drops the items of the shard not yet written, so the cache holds only whole shards and a
    rerun's ``missing()`` names what is left."""

    def __init__(self, cache: TrainingCache, shard_items: int, shard_bytes: int):
        self._cache = cache
        self._shard_items = shard_items
        self._shard_bytes = shard_bytes
        self._pending: list[tuple[str, str, dict[str, torch.Tensor]]] = []
        self._pending_bytes = 0

    def __enter__(self) -> CacheWriter:
        self._cache._begin_writing()
        return self

    def add(self, key: str, digest: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Queues one item's tensors, copied to the CPU (the caller may reuse its buffers or free the device's)."""
        if not isinstance(key, str) or not key or not isinstance(digest, str):
            raise TypeError(f"a cache item needs a non-empty str key and a str digest, got {key!r}, {digest!r}")
        if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors.values()):
            raise ControlNeXtError(f"Cache item {key!r} needs at least one tensor, and only tensors.")
        copies = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
        self._pending.append((key, digest, copies))
        self._pending_bytes += sum(tensor.numel() * tensor.element_size() for tensor in copies.values())
        if len(self._pending) >= self._shard_items or self._pending_bytes >= self._shard_bytes:
            self._flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self._flush()
        self._pending = []

    def flush(self) -> None:
        """Writes the items added so far as a shard now: a caller that stops between items (a Cancel,
        a picture that cannot be read) keeps every item it encoded, and a rerun goes on after them."""
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._cache._commit_shard(self._pending)
        self._pending = []
        self._pending_bytes = 0


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary)``, synced, then renamed onto ``path``: ``path`` is the old file or the whole new one."""
    temporary = os.path.join(os.path.dirname(path), f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}")
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, safetensors.SafetensorError) as error:
        cache = os.path.dirname(path)
        cache = os.path.dirname(cache) if os.path.basename(cache) == SHARDS_FOLDER else cache
        raise ControlNeXtError(f"Could not write {path} of the training cache ({error}); the pairs cached before are "
                               f"kept in {cache}. {write_advice(error)}, then queue again: the cache goes on from "
                               f"where it stopped.") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _names_by_row(tensor_names: Iterable[str]) -> dict[int, list[str]]:
    """A shard's tensor names "<row>.<name>" grouped by row."""
    names: dict[int, list[str]] = {}
    for tensor_name in tensor_names:
        row, name = tensor_name.split(".", 1)
        names.setdefault(int(row), []).append(name)
    return names


def _put(batch: dict[str, torch.Tensor], name: str, position: int, size: int, tensor: torch.Tensor,
         keys: Sequence[str]) -> None:
    """Copies one item's tensor into its row of the batch (allocated at the first item: no second copy)."""
    if name not in batch:
        batch[name] = torch.empty((size, *tensor.shape), dtype=tensor.dtype)
    stacked = batch[name]
    if stacked.shape[1:] != tensor.shape or stacked.dtype != tensor.dtype:
        raise ControlNeXtError(
            f"Training cache item {keys[position]!r} has a {name} of {tuple(tensor.shape)} {tensor.dtype}, "
            f"another item of the batch {tuple(stacked.shape[1:])} {stacked.dtype}: items of different sizes "
            "cannot share a batch (group the pictures by size first).")
    stacked[position] = tensor
