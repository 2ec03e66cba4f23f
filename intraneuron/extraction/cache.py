"""Content-addressed, atomically written, checksum-verified cache of activation profiles.

The key hashes everything that changes the numbers (model fingerprint and dtype, corpus content
hash, window length, layer, sites, reducer settings, engine version) and nothing else, so a sweep
over analysis-only settings (thresholds, clustering, segmentation) extracts once. An entry is a
folder `<root>/profiles/<key>/` holding `profile.safetensors` and `manifest.json`; it appears by
a single directory rename, so a crash never leaves a half-written entry under a valid key, and a
corrupt one (a manifest field missing, checksum mismatch of the tensors or of the manifest,
unreadable) is deleted and rebuilt rather than trusted. Temporary folders of killed writers are
reclaimed when a cache is opened, and a per-key lock lets concurrent jobs on one key extract once;
its file goes with its release, and lock files of killed jobs no one holds when a cache is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, concurrent jobs may both extract (still safe)
    fcntl = None

from safetensors.torch import load_file, save_file

from intraneuron.extraction.profile import ActivationProfile
from intraneuron.hashing import file_sha256
from intraneuron.saving import save_errors_as_oserror

log = logging.getLogger(__name__)

ENGINE_VERSION = 4  # bump when a change to the engine changes the numbers it writes or the key
# (4: more pseudo-neurons than d_mlp get one rotation per block of d_mlp, not duplicates under one)


# what `save` writes besides the metadata (under TensorCache.metadata_key); `load` requires them all
MANIFEST_FIELDS = ("key", "key_fields", "engine_version", "sha256", "versions", "manifest_sha256")
TMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"
STALE_TMP_SECONDS = 3600.0  # a save takes seconds: a temporary folder this old was abandoned


def cache_key(fields: dict) -> str:
    canonical = json.dumps({**fields, "engine_version": ENGINE_VERSION}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def manifest_sha256(manifest: dict) -> str:
    """Checksum of a manifest's canonical JSON, without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _host_tag() -> str:
    """Short tag of this host in temporary names: a PID only means something on its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _probe_write(folder: Path) -> None:
    """Create and delete a file in `folder`: raises OSError when it cannot take new files."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=folder)
    os.close(fd)
    os.unlink(name)


def _acquire(path: Path, wait: bool) -> int | None:
    """A descriptor holding the exclusive lock on the file at `path` (created if absent); None when
    another process holds it and `wait` is false."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            log.info("cache %s: waiting for another job writing entry %s", path.parent, path.name[len(LOCK_PREFIX):])
            fcntl.flock(fd, fcntl.LOCK_EX)
        # the holder unlinks the file before releasing it: retry unless ours is still the file there
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Unlink the lock file, then release it: a waiter on the unlinked file sees it is gone and retries."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)  # releases the lock


class TensorCache:
    """Entries `<root>/<folder>/<key>/` of named tensors (`tensors.safetensors`) and a JSON
    manifest (what they are, the key's fields, the checksum), written and verified as above."""

    tensor_file = "tensors.safetensors"
    metadata_key = "metadata"

    def __init__(self, root: Path, folder: str):
        self.root = Path(root) / folder
        self.reclaim_stale_tmp()
        self.reclaim_stale_locks()

    def writable(self) -> bool:
        """Whether saves can succeed, checked before a long pass so that it is not lost at the end."""
        try:
            _probe_write(self.root)
        except OSError as err:
            log.warning("cache %s is not writable: results will not be cached (%s)", self.root, err)
            return False
        return True

    def reclaim_stale_tmp(self, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
        """Remove `.tmp-*` folders left by killed saves: their writer on this host is dead, or they
        are older than `max_age` seconds. Best effort: a read-only cache keeps them."""
        removed = []
        try:
            candidates = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        except OSError:
            return removed
        now, host = time.time(), _host_tag()
        for path in candidates:
            parts = path.name[len(TMP_PREFIX):].split("-")
            dead = len(parts) >= 3 and parts[0].isdigit() and parts[1] == host and not _pid_alive(int(parts[0]))
            try:
                old = now - path.lstat().st_mtime > max_age
            except OSError:
                continue  # gone already
            if dead or old:
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path)
        if removed:
            log.info("cache %s: removed %d stale temporary folder(s)", self.root, len(removed))
        return removed

    @contextlib.contextmanager
    def locked(self, keys: Iterable[str]) -> Iterator[None]:
        """Hold advisory locks on `keys` (in sorted order, so two holders cannot deadlock) from a
        miss until the save, so that a second job on the same key waits and then loads the entry."""
        with contextlib.ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self._lock(key))
            yield

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{LOCK_PREFIX}{key}"
        fd = _acquire(path, wait=True)
        try:
            yield
        finally:
            _release(path, fd)

    def reclaim_stale_locks(self) -> list[Path]:
        """Remove `.lock-*` files that no job holds: a job killed by SIGKILL (the OOM killer, a
        launcher stopping its workers) could not remove its own. Taking such a lock without
        waiting and releasing it is what its holder would have done; a held one is left alone.
        Best effort: a read-only cache keeps them."""
        removed = []
        if fcntl is None:
            return removed
        try:
            candidates = [p for p in self.root.iterdir() if p.name.startswith(LOCK_PREFIX)]
        except OSError:
            return removed
        for path in candidates:
            try:
                fd = _acquire(path, wait=False)
            except OSError:
                continue
            if fd is not None:
                _release(path, fd)
                removed.append(path)
        if removed:
            log.info("cache %s: removed %d lock file(s) left by killed jobs", self.root, len(removed))
        return removed

    def entry(self, key: str) -> Path:
        return self.root / key

    def remove(self, key: str) -> None:
        """Delete an entry (best effort): the partial profiles of corpus shards once merged. It
        leaves its key by one rename (a reader sees it whole or absent), then goes."""
        doomed = self.root / f"{TMP_PREFIX}{os.getpid()}-{_host_tag()}-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.entry(key), doomed)
        except OSError:  # absent already
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def load(self, key: str) -> tuple[dict, dict] | None:
        """(tensors, metadata) of an entry (see `decode`), or None when absent; a corrupt one (a
        manifest field missing, a checksum that does not verify, unreadable) is removed."""
        entry = self.entry(key)
        if not entry.exists():
            return None
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
            # every entry under a current key was written with all of these (ENGINE_VERSION 3 came
            # after the manifest checksum): one that lacks any was damaged, and is not trusted
            missing = [f for f in (*MANIFEST_FIELDS, self.metadata_key) if f not in manifest]
            if missing:
                raise ValueError(f"manifest lacks {', '.join(missing)}")
            if manifest_sha256(manifest) != manifest["manifest_sha256"]:
                raise ValueError("manifest checksum mismatch")
            if manifest["key"] != key:
                raise ValueError(f"manifest of key {manifest['key']!r}")
            tensor_file = entry / self.tensor_file
            if file_sha256(tensor_file) != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            return self.decode(load_file(tensor_file), manifest[self.metadata_key])
        except Exception as err:  # any damage means: rebuild
            log.warning("cache entry %s is corrupt (%s); removing it and rebuilding", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def decode(self, tensors: dict, metadata: dict):
        """What `load` returns for a verified entry; metadata it cannot take means a corrupt entry."""
        return tensors, metadata

    def save(self, key: str, tensors: dict, metadata: dict, key_fields: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{_host_tag()}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            tensor_file = tmp / self.tensor_file
            with save_errors_as_oserror(tensor_file):  # the cache's callers catch OSError
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tensor_file)
            manifest = {
                "key": key,
                "key_fields": key_fields,
                "engine_version": ENGINE_VERSION,
                self.metadata_key: metadata,
                "sha256": file_sha256(tensor_file),
                "versions": {p: version(p) for p in ("torch", "transformers", "safetensors")},
            }
            manifest = json.loads(json.dumps(manifest))  # checksum what a reader will parse (int keys...)
            manifest["manifest_sha256"] = manifest_sha256(manifest)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            final = self.entry(key)
            try:
                os.rename(tmp, final)
            except OSError:  # another process wrote the same key first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class ProfileCache(TensorCache):
    """Activation profiles, one entry per (model, corpus, layer, statistics) key."""

    tensor_file = "profile.safetensors"
    metadata_key = "profile"  # the layout entries have had since the first engine version

    def __init__(self, root: Path):
        super().__init__(root, "profiles")

    def load(self, key: str) -> ActivationProfile | None:
        """The cached profile, or None when absent; a corrupt entry is removed (and None returned)."""
        return super().load(key)

    def decode(self, tensors: dict, metadata: dict) -> ActivationProfile:
        return ActivationProfile(tensors=tensors, **metadata)

    def save(self, key: str, profile: ActivationProfile, key_fields: dict) -> Path:
        return super().save(key, profile.tensors, profile.metadata(), key_fields)


class CachedProfile(ActivationProfile):
    """A profile saved by this extraction whose tensors are read back from the cache when first
    used: an extraction of many layers (several planned passes) returns them without holding them
    all; a caller that drops each layer after use (runner.run) holds one at a time."""

    def __init__(self, cache: ProfileCache, key: str, metadata: dict):
        super().__init__(**metadata, tensors=_LoadOnUse(cache, key))


class _LoadOnUse(Mapping):
    def __init__(self, cache: ProfileCache, key: str):
        self.cache, self.key, self.loaded = cache, key, None

    def _tensors(self) -> dict:
        if self.loaded is None:
            profile = self.cache.load(self.key)
            if profile is None:
                raise RuntimeError(f"profile {self.cache.entry(self.key)} was removed from the cache during the job")
            self.loaded = profile.tensors
        return self.loaded

    def __getitem__(self, name: str):
        return self._tensors()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors())

    def __len__(self) -> int:
        return len(self._tensors())
