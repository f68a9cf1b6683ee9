"""The prepared-weights cache: a model converted once (dequantized, in one dtype) and reused.

Layout: `<cache_dir>/prepared/<key>/` holds model.safetensors, config.json, tokenizer files and
complete.json. The key hashes everything that changes the result: the source's absolute path,
size and mtime, the dtype, the quantization and FORMAT_VERSION. An entry is built in a temp dir
beside its final place, complete.json is written last, and the dir is then renamed into place, so
an entry without its marker (a crash, a copy cut short) is never trusted: it is rebuilt. One lock
file keeps two processes from building at the same time; the second finds the first's entry.
"""

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1  # bump whenever the prepared layout or a weight transform changes
MARKER_FILE = "complete.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CacheKey:
    """Everything a prepared entry depends on; any change makes a different entry."""

    source: str  # resolved absolute path
    size: int
    mtime_ns: int
    dtype: str
    quantization: str
    format_version: int = FORMAT_VERSION

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PreparedContents:
    """What a build wrote, recorded in the marker so a cache hit needs nothing else."""

    num_weights: int
    weights_bytes: int  # size of model.safetensors; a shorter file on disk is not trusted
    has_tokenizer: bool


@dataclass(frozen=True)
class PreparedEntry:
    directory: Path
    contents: PreparedContents

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE


def cache_key(source: Path, dtype: torch.dtype, quantization: str = "none") -> CacheKey:
    resolved = source.resolve()
    stat = resolved.stat()
    return CacheKey(str(resolved), stat.st_size, stat.st_mtime_ns, str(dtype), quantization)


@dataclass(frozen=True)
class PreparedCache:
    """The `prepared/` directory of one cache dir."""

    root: Path

    def find(self, key: CacheKey) -> PreparedEntry | None:
        """The complete entry for `key`, or None if there is none to trust."""
        directory = self.root / key.digest
        try:
            marker = json.loads((directory / MARKER_FILE).read_text())
            contents = PreparedContents(**marker["contents"])
            weights_bytes = (directory / WEIGHTS_FILE).stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if marker.get("key") != asdict(key) or weights_bytes != contents.weights_bytes:
            return None
        return PreparedEntry(directory, contents)

    def get_or_build(
        self, key: CacheKey, build: Callable[[Path], PreparedContents]
    ) -> PreparedEntry:
        """The entry for `key`, calling `build(empty_dir)` to make it if needed."""
        if entry := self.find(key):
            return entry
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            # Another process may have built it while this one waited for the lock.
            return self.find(key) or self._build(key, build)

    def _build(self, key: CacheKey, build: Callable[[Path], PreparedContents]) -> PreparedEntry:
        final = self.root / key.digest
        temp = self.root / f".{key.digest}.building"
        shutil.rmtree(temp, ignore_errors=True)  # left by a crashed build; we hold the lock
        temp.mkdir()
        try:
            contents = build(temp)
            _write_marker(temp, key, contents)
            _move_into_place(temp, final)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        self._remove_outdated(key)
        return PreparedEntry(final, contents)

    def _remove_outdated(self, key: CacheKey) -> None:
        """Drop every entry (any dtype) made from an older version of the same source file."""
        current = (key.size, key.mtime_ns, key.format_version)
        for marker_path in self.root.glob(f"*/{MARKER_FILE}"):
            try:
                other = json.loads(marker_path.read_text())["key"]
                version = (other["size"], other["mtime_ns"], other["format_version"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if other.get("source") == key.source and version != current:
                shutil.rmtree(marker_path.parent, ignore_errors=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _write_marker(directory: Path, key: CacheKey, contents: PreparedContents) -> None:
    marker = {"key": asdict(key), "contents": asdict(contents)}
    with (directory / MARKER_FILE).open("w") as out:
        json.dump(marker, out, indent=2)
        out.flush()
        os.fsync(out.fileno())


def _move_into_place(temp: Path, final: Path) -> None:
    """Rename `temp` to `final`, replacing an untrusted leftover at `final` if there is one."""
    if final.exists():
        discarded = final.with_name(f".{final.name}.discarded")
        shutil.rmtree(discarded, ignore_errors=True)
        final.rename(discarded)
        shutil.rmtree(discarded, ignore_errors=True)
    temp.rename(final)
    directory_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # make the rename itself durable
    finally:
        os.close(directory_fd)
