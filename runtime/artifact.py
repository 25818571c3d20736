"""Open an artifact directory: read the manifest, check every file against its size and sha256.

Hashing reads every byte (seconds for a small model, tens of seconds for a 7B one; figures in docs/runtime.md), so a
file whose sha256 matched is remembered with its stat fingerprint (size, mtime and ctime in ns, inode, device)
in a small record under `$LLAMA_EXPORT_CACHE` (default `$XDG_CACHE_HOME/llama-export`, else
`~/.cache/llama-export`), one per artifact directory. The next open hashes only the files whose fingerprint
changed: any write to a file, and any `touch` of it, changes its ctime, which no user can set back. The check
guards against corruption and changed files, not against someone who can write both the artifact and your cache.
`LLAMA_EXPORT_VERIFY=always` hashes every file on every open; a cache that cannot be written is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SUPPORTED_FORMAT = 1
LOUD_BYTES = 256 << 20  # files at least this large say that they are being hashed


class ArtifactError(ValueError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    root = os.environ.get("LLAMA_EXPORT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-export"


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedFiles:
    """The files of one artifact directory whose sha256 matched, with their fingerprints then."""

    def __init__(self, directory: Path):
        self.directory = str(directory.resolve())
        key = hashlib.sha256(self.directory.encode()).hexdigest()[:32]
        self.path = cache_root() / "verified" / f"{key}.json"
        self.files: dict[str, dict] = {}
        try:
            record = json.loads(self.path.read_text())
            if record.get("directory") == self.directory and isinstance(record.get("files"), dict):
                self.files = record["files"]
        except (OSError, ValueError):
            pass
        self.loaded = dict(self.files)

    def known(self, name: str, sha: str, fingerprint: list[int]) -> bool:
        entry = self.files.get(name)
        return isinstance(entry, dict) and entry.get("sha256") == sha and entry.get("stat") == fingerprint

    def add(self, name: str, sha: str, fingerprint: list[int]) -> None:
        self.files[name] = {"sha256": sha, "stat": fingerprint}

    def save(self, names: set[str]) -> None:
        """Write the record of these files (atomically), if it changed and the cache is writable."""
        files = {name: entry for name, entry in self.files.items() if name in names}
        if files == self.loaded:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"directory": self.directory, "files": files}, f)
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def head_dim(self) -> int:
        c = self.config
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def graph_path(self) -> Path:
        return self.directory / self.manifest["graph"]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.directory / "tokenizer.model"
        return path if "tokenizer.model" in self.manifest["files"] else None

    @property
    def flavour(self) -> str:
        return self.manifest["graph"].get("flavour", "portable")

    @property
    def max_sequence_length(self) -> int | None:
        """The static cache's slots (None for a portable graph, whose cache grows)."""
        value = self.manifest["graph"].get("max_sequence_length")
        return int(value) if value is not None else None

    @property
    def max_length(self) -> int:
        """The context window: the model's positions, or the static cache's slots if fewer."""
        return min(int(self.config["max_position_embeddings"]), self.max_sequence_length or 1 << 62)

    @classmethod
    def open(cls, directory: str | Path, log: Callable[[str], None] | None = None) -> "Artifact":
        """Read the manifest and check the files it lists: each file's size, and its sha256 unless the record of
        verified files (module docstring) knows it unchanged. `log` hears of each large file being hashed."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not directory.is_dir():
            what = "is a file" if directory.exists() else "does not exist"
            raise ArtifactError(f"{directory} {what}: give an artifact directory (make one with llama-export)")
        if not manifest_path.is_file():
            raise ArtifactError(f"{directory}: no manifest.json; not an artifact directory (make one with llama-export)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{manifest_path}: not valid JSON ({err}); re-export the artifact") from None
        version = manifest.get("format_version")
        if version != SUPPORTED_FORMAT:
            raise ArtifactError(f"{manifest_path}: format_version {version!r} is not supported "
                                f"(this runtime reads {SUPPORTED_FORMAT}); re-export with this llama-export")
        files = manifest.get("files", {})
        verified = VerifiedFiles(directory)
        if os.environ.get("LLAMA_EXPORT_VERIFY") == "always":
            verified.files.clear()
        for name, info in files.items():
            path = directory / name
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing; re-export the artifact")
            if path.stat().st_size != info["bytes"]:
                raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {info['bytes']}; "
                                    f"the file was changed or truncated — re-export the artifact")
            fingerprint = _fingerprint(path)  # before reading: a write during the hash changes it again
            if verified.known(name, info["sha256"], fingerprint):
                continue
            if log is not None and info["bytes"] >= LOUD_BYTES:
                log(f"checking {path} ({info['bytes'] / 1e9:.1f} GB) against the manifest's sha256")
            if sha256(path) != info["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was modified — "
                                    f"re-export the artifact")
            verified.add(name, info["sha256"], fingerprint)
        verified.save(set(files))
        return cls(directory, manifest)
