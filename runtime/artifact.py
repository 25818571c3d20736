"""Open an artifact directory: read the manifest, check every file against its size and sha256.

Hashing reads every byte (seconds for a small model, tens of seconds for a 7B one; figures in docs/runtime.md), so a
file whose sha256 matched is remembered with its stat fingerprint (size, mtime and ctime in ns, inode, device)
in a small record under `$LLAMA_EXPORT_CACHE` (default `$XDG_CACHE_HOME/llama-export`, else
`~/.cache/llama-export`), one per artifact directory. The next open hashes only the files whose fingerprint
changed: any write to a file, and any `touch` of it, changes its ctime, which no user can set back. A record
counts only for the manifest it was made with (its sha256 is in the record), only if this user owns it and no one
else can write it; it is written owner-only and atomically. The check guards against corruption and changed files,
not against someone who can write your cache (docs/security.md has the threat model).
`LLAMA_EXPORT_VERIFY=always` hashes every file on every open; a cache that cannot be written is skipped.

An artifact may come from someone else, so every file name its manifest gives must be a plain name of a regular
file inside the directory (no absolute path, no `..`, no symbolic link), every file the runtime reads must be
listed with its sha256, and the graph's external weights may only come from listed files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifact_format import ArtifactError, Manifest, parse_manifest, sha256

LOUD_BYTES = 256 << 20  # files at least this large say that they are being hashed


def cache_root() -> Path:
    root = os.environ.get("LLAMA_EXPORT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-export"


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _private_file(path: Path) -> bool:
    """A regular file this user owns that no one else can write (a record anyone else could plant is ignored)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


class VerifiedFiles:
    """The files of one artifact directory whose sha256 matched, with their fingerprints then, for one manifest."""

    def __init__(self, directory: Path, manifest_sha256: str):
        self.directory = str(directory.resolve())
        self.manifest_sha256 = manifest_sha256
        key = hashlib.sha256(self.directory.encode()).hexdigest()[:32]
        self.path = cache_root() / "verified" / f"{key}.json"
        self.files: dict[str, dict] = {}
        try:
            if _private_file(self.path):
                record = json.loads(self.path.read_text())
                if (record.get("directory") == self.directory and record.get("manifest_sha256") == manifest_sha256
                        and isinstance(record.get("files"), dict)):
                    self.files = record["files"]
        except (OSError, ValueError, AttributeError):
            self.files = {}
        self.loaded = dict(self.files)

    def known(self, name: str, sha: str, fingerprint: list[int]) -> bool:
        entry = self.files.get(name)
        return isinstance(entry, dict) and entry.get("sha256") == sha and entry.get("stat") == fingerprint

    def add(self, name: str, sha: str, fingerprint: list[int]) -> None:
        self.files[name] = {"sha256": sha, "stat": fingerprint}

    def save(self, names: set[str]) -> None:
        """Write the record of these files (owner-only, atomically), if it changed and the cache is writable."""
        files = {name: entry for name, entry in self.files.items() if name in names}
        if files == self.loaded:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")  # mode 0600
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"directory": self.directory, "manifest_sha256": self.manifest_sha256, "files": files}, f)
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _plain_name(name: object, manifest_path: Path, what: str) -> str:
    """`name` if it names a file directly inside the artifact directory; else the refusal."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ArtifactError(f"{manifest_path}: {what} {name!r} is not a plain file name inside the artifact "
                            f"directory (absolute paths, '..' and sub-directories are refused); re-export the "
                            f"artifact, and do not run artifacts whose origin you do not trust")
    return name


def _external_data_files(graph: Path) -> set[str]:
    """The files the ONNX graph's initializers read their bytes from (their `location`, as written)."""
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise ArtifactError(f"{graph}: not a readable ONNX model ({type(err).__name__}); re-export the artifact") \
            from None
    graphs, found = [model.graph], set()
    while graphs:
        g = graphs.pop()
        for tensor in g.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                found |= {entry.value for entry in tensor.external_data if entry.key == "location"}
        for node in g.node:
            graphs += [a.g for a in node.attribute if a.HasField("g")] + list(
                sub for a in node.attribute for sub in a.graphs)
            for a in node.attribute:
                if a.HasField("t") and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    found |= {entry.value for entry in a.t.external_data if entry.key == "location"}
    return found


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: Manifest

    @property
    def config(self) -> dict:
        """The model's Hugging Face config (config.json's fields)."""
        return self.manifest.model.config

    @property
    def head_dim(self) -> int:
        return self.manifest.model.head_dim

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def graph_path(self) -> Path:
        return self.directory / self.manifest.graph.file

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.directory / "tokenizer.model"
        return path if "tokenizer.model" in self.manifest.files else None

    @property
    def flavour(self) -> str:
        return self.manifest.graph.flavour

    @property
    def max_sequence_length(self) -> int | None:
        """The static cache's slots (None for a portable graph, whose cache grows)."""
        return self.manifest.graph.max_sequence_length

    @property
    def max_length(self) -> int:
        """The context window: the model's positions, or the static cache's slots if fewer."""
        return min(int(self.config["max_position_embeddings"]), self.max_sequence_length or 1 << 62)

    @classmethod
    def open(cls, directory: str | Path, log: Callable[[str], None] | None = None) -> "Artifact":
        """Read the manifest (`artifact_format`) and check the files it lists: each file's size, and its sha256
        unless the record of verified files (module docstring) knows it unchanged. `log` hears of each large file
        being hashed."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not directory.is_dir():
            what = "is a file" if directory.exists() else "does not exist"
            raise ArtifactError(f"{directory} {what}: give an artifact directory (make one with llama-export)")
        if not manifest_path.is_file():
            raise ArtifactError(f"{directory}: no manifest.json; not an artifact directory (make one with llama-export)")
        if ".partial-" in directory.resolve().name:
            raise ArtifactError(f"{directory}: an unfinished export (llama-export builds in this hidden directory and "
                                f"renames it when complete); run llama-export again, which removes it")
        raw = manifest_path.read_bytes()
        manifest = parse_manifest(raw, manifest_path)
        files, graph = manifest.files, manifest.graph
        for name in files:
            _plain_name(name, manifest_path, "file")
        read = {"graph file": graph.file, "graph data": graph.data}
        if manifest.tensorrt is not None and manifest.tensorrt.engine is not None:
            read["TensorRT engine"] = manifest.tensorrt.engine.file
        for what, name in read.items():
            if _plain_name(name, manifest_path, what) not in files:
                raise ArtifactError(f"{manifest_path}: the {what} {name!r} is not listed in 'files' with its "
                                    f"sha256, so it cannot be checked; re-export the artifact")
        verified = VerifiedFiles(directory, hashlib.sha256(raw).hexdigest())
        if os.environ.get("LLAMA_EXPORT_VERIFY") == "always":
            verified.files.clear()
        for name, info in files.items():
            path = directory / name
            if path.is_symlink():
                raise ArtifactError(f"{path}: a symbolic link; an artifact's files must be regular files inside its "
                                    f"directory — re-export the artifact (or copy it with its links resolved)")
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing; re-export the artifact")
            if path.stat().st_size != info.bytes:
                raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes}; "
                                    f"the file was changed or truncated — re-export the artifact")
            fingerprint = _fingerprint(path)  # before reading: a write during the hash changes it again
            if verified.known(name, info.sha256, fingerprint):
                continue
            if log is not None and info.bytes >= LOUD_BYTES:
                log(f"checking {path} ({info.bytes / 1e9:.1f} GB) against the manifest's sha256")
            if sha256(path) != info.sha256:
                raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was modified — "
                                    f"re-export the artifact")
            verified.add(name, info.sha256, fingerprint)
        outside = _external_data_files(directory / graph.file) - set(files)
        if outside:
            raise ArtifactError(f"{directory / graph.file}: reads weights from {sorted(outside)[0]!r}, which is "
                                f"not a file listed in the manifest; re-export the artifact")
        verified.save(set(files))
        return cls(directory, manifest)
