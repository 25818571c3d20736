"""Artifacts from someone else: any changed byte is seen before use, the verified-files record cannot vouch for a
changed file, and checkpoint pickles are read with weights_only only (docs/security.md has the threat model).

The refusals of hostile manifests (absolute paths, '..', symbolic links, weights read from outside) are cases of
the bad-input catalogue (tests/test_bad_inputs.py, `artifact-*`).
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_export.runtime.artifact import Artifact, ArtifactError, VerifiedFiles
import llama_export.runtime.artifact as artifact_module
from llama_export.runtime.artifact_format import manifest_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from llama_export.exporter.write_artifact import build_artifact
    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.checkpoint import truncate_layers
    from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint

    out = tmp_path_factory.mktemp("untrusted") / "art"
    build_artifact(truncate_layers(resolve_checkpoint("tiny"), 1), out, ExportOptions(optimize=False),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)  # the traced graph: quick
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAMA_EXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def flip(path: Path, offset: int, xor: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ xor]))


def refused(directory: Path) -> str | None:
    try:
        Artifact.open(directory)
    except ArtifactError as err:
        return str(err)
    return None


def test_every_changed_byte_in_every_file_is_seen(artifact, tmp_path, cache):
    """Random offsets in every file of the directory, the manifest included: each change is refused, while the
    record of verified files knows every other file (so it is the record, too, that must not vouch for it)."""
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    assert refused(copy) is None  # the record now holds every file
    files = sorted(p.name for p in copy.iterdir())
    assert set(files) == set(json.loads((copy / "manifest.json").read_text())["files"]) | {"manifest.json"}
    rng = random.Random(0)
    offsets = {name: [0, (copy / name).stat().st_size - 1] + [rng.randrange((copy / name).stat().st_size)
                                                                for _ in range(4)] for name in files}

    @settings(derandomize=True, max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(files), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
    def changed_byte_is_refused(name, where, xor):
        offset = int(where * (copy / name).stat().st_size)
        flip(copy / name, offset, xor)
        try:
            assert refused(copy) is not None, (name, offset, xor)
        finally:
            flip(copy / name, offset, xor)

    changed_byte_is_refused()
    for name, places in offsets.items():  # and every file at its first, last and four random bytes
        for offset in places:
            flip(copy / name, offset, 0x01)
            try:
                assert refused(copy) is not None, (name, offset)
            finally:
                flip(copy / name, offset, 0x01)
    assert refused(copy) is None  # restored byte for byte: accepted again


def test_verified_record_is_private_and_tied_to_the_manifest(artifact, tmp_path, cache, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    files = set(json.loads((copy / "manifest.json").read_text())["files"])
    hashed = []
    real_sha256 = artifact_module.sha256
    monkeypatch.setattr(artifact_module, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))

    Artifact.open(copy)
    record = next((cache / "verified").glob("*.json"))
    assert record.stat().st_mode & 0o777 == 0o600 and (cache / "verified").stat().st_mode & 0o777 == 0o700
    saved = json.loads(record.read_text())
    assert saved["manifest_sha256"] == artifact_module.hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
    hashed.clear()
    Artifact.open(copy)
    assert hashed == []  # known

    # a record others could have written is not believed
    record.chmod(0o622)
    Artifact.open(copy)
    assert sorted(hashed) == sorted(files)
    record.chmod(0o600)
    hashed.clear()

    # a record made for another manifest is not believed: rewriting the manifest (sealed again, every file as it
    # was) makes every file be hashed again
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["name"] = "renamed"
    (copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    Artifact.open(copy)
    assert sorted(hashed) == sorted(files)
    hashed.clear()

    # a record that is a symbolic link to a record is not believed
    target = record.with_name("elsewhere.json")
    record.rename(target)
    record.symlink_to(target)
    Artifact.open(copy)
    assert sorted(hashed) == sorted(files)
    hashed.clear()

    # a changed file with a record forged to match the old digest and the new fingerprint, in a cache only the
    # owner writes: this is the limit of the record (whoever writes your cache is you) — documented, and then
    # LLAMA_EXPORT_VERIFY=always still refuses it
    record.unlink()
    Artifact.open(copy)
    data = copy / "model.onnx.data"
    flip(data, 100, 0x10)
    forged = json.loads(record.read_text())  # the fresh record the open above wrote
    now = data.stat()
    forged["files"]["model.onnx.data"]["stat"] = [now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino,
                                                  now.st_dev]
    assert VerifiedFiles(copy, forged["manifest_sha256"]).path == record
    record.write_text(json.dumps(forged))
    assert refused(copy) is None
    monkeypatch.setenv("LLAMA_EXPORT_VERIFY", "always")
    assert "model.onnx.data: sha256 does not match the manifest" in refused(copy)


def test_an_unfinished_export_is_not_an_artifact(artifact, tmp_path):
    partial = tmp_path / ".art.partial-abc123"
    shutil.copytree(artifact, partial)
    assert "an unfinished export" in refused(partial)


def test_checkpoint_pickles_are_read_with_weights_only():
    """Every torch.load in the project passes weights_only=True (the catalogue's `pickle-with-code` case shows a
    pickle that would run a command being refused, and the command not run)."""
    calls = []
    for folder in ("exporter", "runtime", "graphs"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    calls.append((f"{file.relative_to(ROOT)}:{node.lineno}", bool(weights_only) and isinstance(
                        weights_only[0].value, ast.Constant) and weights_only[0].value.value is True))
    assert calls and all(ok for _, ok in calls), calls
    assert not any("pickle.load" in (ROOT / f).read_text() for f in ("exporter/checkpoint.py", "runtime/artifact.py"))


def test_os_system_payload_is_not_run(tmp_path):
    """A pytorch_model.bin whose unpickling would run a command: refused, and the command never runs."""
    import pickle

    from llama_export.exporter.checkpoint import torch_load_lazy
    from llama_export.exporter.errors import ExportError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ExportError, match="Refusing to unpickle arbitrary objects"):
        torch_load_lazy(file)
    assert not marker.exists()
