"""Content-addressed, atomically written, checksum-verified cache of activation profiles.

The key hashes everything that changes the numbers (model fingerprint and dtype, corpus content
hash, window length, layer, sites, reducer settings, engine version) and nothing else, so a sweep
over analysis-only settings (thresholds, clustering, segmentation) extracts once. An entry is a
folder `<root>/profiles/<key>/` holding `profile.safetensors` and `manifest.json`; it appears by
a single directory rename, so a crash never leaves a half-written entry under a valid key, and a
corrupt one (checksum mismatch, unreadable) is deleted and rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from importlib.metadata import version
from pathlib import Path

from safetensors.torch import load_file, save_file

from intraneuron.extraction.profile import ActivationProfile
from intraneuron.hashing import file_sha256

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # bump when a change to the engine changes the numbers it writes or the key


def cache_key(fields: dict) -> str:
    canonical = json.dumps({**fields, "engine_version": ENGINE_VERSION}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class TensorCache:
    """Entries `<root>/<folder>/<key>/` of named tensors (`tensors.safetensors`) and a JSON
    manifest (what they are, the key's fields, the checksum), written and verified as above."""

    tensor_file = "tensors.safetensors"
    metadata_key = "metadata"

    def __init__(self, root: Path, folder: str):
        self.root = Path(root) / folder

    def entry(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> tuple[dict, dict] | None:
        """(tensors, metadata) of an entry, or None when absent; a corrupt one is removed."""
        entry = self.entry(key)
        if not entry.exists():
            return None
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
            tensor_file = entry / self.tensor_file
            if file_sha256(tensor_file) != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            return load_file(tensor_file), manifest[self.metadata_key]
        except Exception as err:  # any damage means: rebuild
            log.warning("cache entry %s is corrupt (%s); removing it and rebuilding", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def save(self, key: str, tensors: dict, metadata: dict, key_fields: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            tensor_file = tmp / self.tensor_file
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tensor_file)
            manifest = {
                "key": key,
                "key_fields": key_fields,
                "engine_version": ENGINE_VERSION,
                self.metadata_key: metadata,
                "sha256": file_sha256(tensor_file),
                "versions": {p: version(p) for p in ("torch", "transformers", "safetensors")},
            }
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
        hit = super().load(key)
        return None if hit is None else ActivationProfile(tensors=hit[0], **hit[1])

    def save(self, key: str, profile: ActivationProfile, key_fields: dict) -> Path:
        return super().save(key, profile.tensors, profile.metadata(), key_fields)
