"""The profile cache under faults: a cache that cannot be written, temporary folders of killed saves,
a tampered manifest, and two jobs extracting the same key at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

from intraneuron.extraction import cache as cache_module
from intraneuron.extraction import engine, extract_profiles
from intraneuron.extraction.cache import ProfileCache
from tests.test_extraction import SETTINGS


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for layer in a:
        assert a[layer].tensors.keys() == b[layer].tensors.keys()
        for name, value in a[layer].tensors.items():
            assert torch.equal(value, b[layer].tensors[name]), (layer, name)


@pytest.fixture(scope="module")
def uncached(tiny_gpt2, small_windows):
    return extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache=None)


def _entries(cache: ProfileCache) -> list:
    return [p for p in cache.root.iterdir() if not p.name.startswith(".")] if cache.root.exists() else []


# ------------------------------------------------------------------ a cache that cannot be written


def test_unwritable_cache_warns_once_and_still_returns_the_profiles(
    tiny_gpt2, small_windows, uncached, tmp_path, monkeypatch, caplog
):
    def refuse(folder):  # as root, permission bits would not stop the write: simulate the refusal
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(cache_module, "_probe_write", refuse)
    saves = []
    monkeypatch.setattr(ProfileCache, "save", lambda *a, **k: saves.append(1))
    cache = ProfileCache(tmp_path)
    profiles = extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    _assert_same(profiles, uncached)
    assert not saves  # not even tried
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 1 and str(cache.root) in warnings[0]
    assert "results will not be cached" in warnings[0]


@pytest.mark.parametrize("how", ["OSError", "SafetensorError"])
def test_a_failed_save_keeps_the_computed_profiles(tiny_gpt2, small_windows, uncached, tmp_path, monkeypatch,
                                                   caplog, how):  # fmt: skip
    from safetensors import SafetensorError

    def disk_full(*_args, **_kwargs):  # safetensors says a full disk its own way (not an OSError)
        if how == "OSError":
            raise OSError(28, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(cache_module, "save_file", disk_full)
    cache = ProfileCache(tmp_path)
    profiles = extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    _assert_same(profiles, uncached)
    warnings = [r.getMessage() for r in caplog.records if "could not save" in r.getMessage()]
    assert len(warnings) == 1 and str(cache.root) in warnings[0]
    assert list(cache.root.iterdir()) == []  # neither an entry nor a temporary folder left


# ------------------------------------------------------------------ temporary folders of killed saves


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folders_are_reclaimed_and_live_ones_kept(tmp_path):
    root = tmp_path / "profiles"
    root.mkdir()
    host = cache_module._host_tag()
    old = time.time() - 2 * cache_module.STALE_TMP_SECONDS
    dead_and_old = root / f".tmp-{_dead_pid()}-{host}-k1-aaaa"
    dead_fresh = root / f".tmp-{_dead_pid()}-{host}-k2-bbbb"
    live = root / f".tmp-{os.getpid()}-{host}-k3-cccc"
    legacy_old = root / ".tmp-0123abcd-dddd"  # the naming before the PID: only age tells
    legacy_fresh = root / ".tmp-4567abcd-eeee"
    other_host_dead = root / f".tmp-{_dead_pid()}-00000000-k4-ffff"  # its PID means nothing here
    entry = root / ("0" * 32)
    for folder in (dead_and_old, dead_fresh, live, legacy_old, legacy_fresh, other_host_dead, entry):
        folder.mkdir()
        (folder / "profile.safetensors").write_bytes(b"x")
    for folder in (dead_and_old, legacy_old, entry):
        os.utime(folder, (old, old))

    ProfileCache(tmp_path)  # opening the cache reclaims
    kept = {p.name for p in root.iterdir()}
    assert kept == {live.name, legacy_fresh.name, other_host_dead.name, entry.name}


def test_save_names_its_temporary_folder_by_pid_and_host(tmp_path, monkeypatch):
    seen = []
    real = cache_module.save_file
    monkeypatch.setattr(cache_module, "save_file", lambda t, path: (seen.append(path.parent.name), real(t, path)))
    cache = ProfileCache(tmp_path)
    cache.save("k" * 32, _profile(), {"layer": 0})
    (name,) = seen
    assert name.startswith(f".tmp-{os.getpid()}-{cache_module._host_tag()}-")


def _profile():
    from intraneuron.extraction.profile import ActivationProfile

    return ActivationProfile(
        layer=0, site="blocks.0.mlp.hook_post", input_site=None, window_len=8, n_tokens=4,
        tensors={"x": torch.arange(4.0)},
    )  # fmt: skip


# ------------------------------------------------------------------ a tampered manifest


def _rerun(handle, windows, cache):
    """The extraction again, and the forward passes it made (none when the cache was trusted)."""
    forwards = []
    hook = handle.model.transformer.wte.register_forward_hook(lambda *_: forwards.append(1))
    try:
        return extract_profiles(handle, windows, [0], SETTINGS, cache), forwards
    finally:
        hook.remove()


def test_an_edited_manifest_is_a_miss_and_the_rerun_restores_the_entry(
    tiny_gpt2, small_windows, uncached, tmp_path, caplog
):
    cache = ProfileCache(tmp_path)
    extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    (entry,) = _entries(cache)
    manifest_file = entry / "manifest.json"
    good = json.loads(manifest_file.read_text())
    assert good["manifest_sha256"] == cache_module.manifest_sha256(good)
    bad = json.loads(manifest_file.read_text())
    bad["profile"]["window_len"] += 1  # tensors untouched: only the manifest checksum can tell
    manifest_file.write_text(json.dumps(bad, indent=2))

    rerun, forwards = _rerun(tiny_gpt2, small_windows, cache)
    assert forwards  # recomputed, not trusted
    assert "manifest checksum mismatch" in caplog.text and str(entry) in caplog.text
    _assert_same(rerun, uncached)
    assert rerun[0].window_len == small_windows.window_len
    restored = json.loads(manifest_file.read_text())
    assert restored["profile"]["window_len"] == small_windows.window_len
    assert restored["manifest_sha256"] == cache_module.manifest_sha256(restored)
    assert cache.load(entry.name) is not None
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # no tmp, no lock left


def _drop_checksum(entry):
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _drop_checksum_and_edit(entry):  # an edit nothing could tell without the manifest checksum
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    manifest["profile"]["window_len"] *= 4
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _drop_field(entry):
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["profile"]["n_tokens"]
    manifest["manifest_sha256"] = cache_module.manifest_sha256(manifest)  # verifies, yet lacks a field
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _edit_tensors(entry):
    tensor_file = entry / "profile.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    tensor_file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_drop_checksum, _drop_checksum_and_edit, _drop_field, _edit_tensors])
def test_an_entry_with_a_missing_field_or_a_failed_checksum_is_rebuilt(
    tiny_gpt2, small_windows, uncached, tmp_path, caplog, damage
):
    cache = ProfileCache(tmp_path)
    extract_profiles(tiny_gpt2, small_windows, [0], SETTINGS, cache)
    (entry,) = _entries(cache)
    damage(entry)

    rerun, forwards = _rerun(tiny_gpt2, small_windows, cache)
    assert forwards  # rebuilt, not trusted
    warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warnings) == 1 and str(entry) in warnings[0]
    _assert_same(rerun, uncached)
    assert rerun[0].window_len == small_windows.window_len and rerun[0].n_tokens == uncached[0].n_tokens
    restored = json.loads((entry / "manifest.json").read_text())
    assert restored["manifest_sha256"] == cache_module.manifest_sha256(restored)
    _assert_same({0: cache.load(entry.name)}, uncached)  # the rebuilt entry is read back as is


# ------------------------------------------------------------------ two jobs on one key


_HOLD_LOCK = """
import sys
from intraneuron.extraction.cache import ProfileCache
with ProfileCache(sys.argv[1]).locked([sys.argv[2]]):
    print("held", flush=True)
    sys.stdin.readline()  # until told to finish
"""


def _lock_holder(root, key: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root), key], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_files_of_killed_jobs_go_when_a_cache_is_opened_and_held_ones_stay(tmp_path):
    killed, live = _lock_holder(tmp_path, "a" * 32), _lock_holder(tmp_path, "b" * 32)
    try:
        root = tmp_path / "profiles"
        live_inode = (root / f".lock-{'b' * 32}").stat().st_ino
        killed.kill()  # SIGKILL: no chance to remove its lock file
        killed.wait()
        assert (root / f".lock-{'a' * 32}").exists()

        ProfileCache(tmp_path)  # what the next job does first; it does not wait for the live lock
        assert [p.name for p in root.iterdir()] == [f".lock-{'b' * 32}"]
        assert (root / f".lock-{'b' * 32}").stat().st_ino == live_inode  # still the one held
        live.communicate("\n", timeout=60)  # a job that finishes takes its lock file with it
        assert live.returncode == 0 and list(root.iterdir()) == []
    finally:
        for holder in (killed, live):
            if holder.poll() is None:
                holder.kill()
                holder.wait()



def _job(handle, windows, cache_root, out, barrier):
    try:
        torch.set_num_threads(1)
        barrier.wait(timeout=60)
        profiles = extract_profiles(handle, windows, [0, 1], SETTINGS, ProfileCache(cache_root))
        torch.save({l: p.tensors for l, p in profiles.items()}, out)
    except BaseException:
        out.with_suffix(".err").write_text(traceback.format_exc())
        raise


def test_two_jobs_on_one_key_extract_once(tiny_gpt2, small_windows, tmp_path, monkeypatch):
    calls = tmp_path / "passes.txt"
    real = engine._run_pass

    def counted(*args, **kwargs):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # hold the lock long enough that the other job surely finds it held
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_run_pass", counted)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"job{i}.pt" for i in range(2)]
    jobs = [ctx.Process(target=_job, args=(tiny_gpt2, small_windows, tmp_path / "cache", o, barrier)) for o in outs]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    for job, out in zip(jobs, outs, strict=True):
        if job.is_alive():
            job.kill()
        err = out.with_suffix(".err")
        assert job.exitcode == 0, err.read_text() if err.exists() else job.exitcode
    assert len(calls.read_text().split()) == 1
    first, second = (torch.load(o) for o in outs)
    assert first.keys() == second.keys() == {0, 1}
    for layer in first:
        for name, value in first[layer].items():
            assert torch.equal(value, second[layer][name]), (layer, name)
    root = tmp_path / "cache" / "profiles"
    assert len(list(root.iterdir())) == 2  # two entries; locks and temporary folders gone
