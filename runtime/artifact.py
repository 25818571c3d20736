"""Open an artifact directory: read the manifest, check every file against its size and sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FORMAT = 1


class ArtifactError(ValueError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    def open(cls, directory: str | Path, check_hashes: bool = True) -> "Artifact":
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
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
        for name, info in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing; re-export the artifact")
            if path.stat().st_size != info["bytes"]:
                raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {info['bytes']}; "
                                    f"the file was changed or truncated — re-export the artifact")
            if check_hashes and sha256(path) != info["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was modified — "
                                    f"re-export the artifact")
        return cls(directory, manifest)
