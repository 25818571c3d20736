"""The bad-input catalogue: every command, every kind of bad input, one table (rendered as docs/bad-inputs.md).

Each case makes its bad input in a fresh directory, runs the command and asserts: the message (naming the file,
flag or value, and the fix), the exit status, no traceback, and that nothing was written (the case's directory and
the shared artifact are unchanged, byte for byte and file for file). The commands run in this process through
click's CliRunner, which hands back any exception that escaped the command: a case passes only when the command
ended through `sys.exit` (or click's own usage error), so "no traceback" is checked on the exception itself, not
only on the text. A few cases run as real subprocesses (`subprocess=True`) where the process matters: a file-size
limit the test sets (the full-disk case) and undecodable bytes on a real command line.

Regenerate the document with `.venv/bin/python tests/test_bad_inputs.py > docs/bad-inputs.md`;
`test_document_matches_the_catalogue` fails when it is stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import small_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
TINY = ROOT / "exporter" / "assets" / "tiny"
MODULES = {"llama-export": "llama_export.exporter.cli", "llama-build": "llama_export.exporter.build_cli", "llama-reference": "llama_export.exporter.reference_cli",
           "llama-generate": "llama_export.runtime.cli", "llama-chat": "llama_export.runtime.chat_cli", "llama-bench": "llama_export.runtime.bench"}


@dataclass(frozen=True)
class Case:
    """One bad input. `args` may name `{case}` (this case's directory), `{ckpt}` (a good small checkpoint copied
    there), `{art}` (a good trt-ready artifact, shared and never changed), `{copy}` (a copy of it in `{case}`) or
    `{tiny}` (the bundled tiny model's directory);
    `make(case_dir)` spoils the input."""

    id: str
    command: str
    what: str  # the bad input, in words (the document's first column)
    args: tuple[str, ...]
    message: str
    make: Callable[[Path], None] | None = None
    exit_code: int = 2
    stdin: str | bytes | None = None
    subprocess: bool = False
    file_size_limit: int | None = None  # RLIMIT_FSIZE for the subprocess: a full disk
    within_s: float | None = None  # must be refused this fast (e.g. 10 MB of text)


# ---- spoilers -----------------------------------------------------------------------------------------------------

def _edit_json(path: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        file = case / path
        data = json.loads(file.read_text())
        change(data)
        file.write_text(json.dumps(data))
    return make


def _config(**fields) -> Callable[[Path], None]:
    return _edit_json("ckpt/config.json", lambda c: c.update(fields))


def _write(path: str, data: bytes | str) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        file = case / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def _truncate(path: str, keep: float) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        file = case / path
        data = file.read_bytes()
        file.write_bytes(data[:int(len(data) * keep)])
    return make


def _safetensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        from safetensors.torch import load_file, save_file

        file = case / "ckpt" / "model.safetensors"
        tensors = load_file(str(file))
        change(tensors)
        save_file(tensors, str(file))
    return make


def _sharded(drop_shard: bool) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        from safetensors.torch import load_file, save_file

        ckpt = case / "ckpt"
        tensors = load_file(str(ckpt / "model.safetensors"))
        (ckpt / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in shards.items():
            if not (drop_shard and file.startswith("model-00002")):
                save_file({n: tensors[n] for n in part}, str(ckpt / file))
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    return make


class _Payload:
    """Unpickling this runs a shell command: a checkpoint from someone who wants to run code."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _pickle_with_code(case: Path) -> None:
    ckpt = case / "ckpt"
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)


def _bin_checkpoint(truncated: bool) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        import torch
        from safetensors.torch import load_file

        ckpt = case / "ckpt"
        tensors = load_file(str(ckpt / "model.safetensors"))
        (ckpt / "model.safetensors").unlink()
        torch.save(tensors, ckpt / "pytorch_model.bin")
        if truncated:
            _truncate("ckpt/pytorch_model.bin", 0.5)(case)
    return make


def _meta_without_shards(case: Path) -> None:
    ckpt = case / "ckpt"
    for file in ckpt.iterdir():
        file.unlink()
    (ckpt / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 2}))


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the artifact's manifest as someone who rewrites it whole would: sealed again (manifest_bytes)."""
    def make(case: Path) -> None:
        from llama_export.runtime.artifact_format import manifest_bytes

        file = case / "copy" / "manifest.json"
        manifest = json.loads(file.read_text())
        change(manifest)
        file.write_bytes(manifest_bytes(manifest))
    return make


def _flip_byte(name: str, offset: int) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        with open(case / "copy" / name, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x20]))
    return make


def _rename_file(old: str, new: str) -> Callable[[Path], None]:
    def change(m: dict) -> None:
        m["files"][new] = m["files"].pop(old)
    return _manifest(change)


def _symlinked_tokenizer(case: Path) -> None:
    target = case / "elsewhere.model"
    shutil.copyfile(case / "copy" / "tokenizer.model", target)
    (case / "copy" / "tokenizer.model").unlink()
    (case / "copy" / "tokenizer.model").symlink_to(target)


def _graph_reads_outside(case: Path) -> None:
    """The graph's first initializer reads its bytes from ../stolen.bin; the manifest lists the new graph's sha256."""
    import onnx

    graph = case / "copy" / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../stolen.bin"
    onnx.save(model, str(graph))
    (case / "stolen.bin").write_bytes(b"\0" * (1 << 20))
    data = graph.read_bytes()

    def change(m: dict) -> None:
        m["files"]["model.onnx"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _manifest(change)(case)


def _chmod(path: str, mode: int) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        (case / path).chmod(mode)
    return make


def _both(*makes: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(case: Path) -> None:
        for m in makes:
            m(case)
    return make


HUGE = "word " * 2_000_000  # 10 MB of text
NOT_UTF8 = "caf\udce9"  # what the bytes b"caf\xe9" (Latin-1) on a command line become in Python
EXPORT = ("--checkpoint", "{ckpt}", "-o", "{case}/out", "--no-verify", "--target", "ort")
PLAIN = ("--checkpoint", "{ckpt}", "-o", "{case}/out", "--no-verify")

CASES: list[Case] = [
    # ---- checkpoints: files ----
    Case("ckpt-missing", "llama-export", "checkpoint directory that does not exist",
         ("--checkpoint", "{case}/nowhere", "-o", "{case}/out"), "nowhere: checkpoint directory not found"),
    Case("ckpt-empty-dir", "llama-export", "empty checkpoint directory", PLAIN,
         "neither a Hugging Face checkpoint (config.json + *.safetensors) nor a Meta one",
         make=lambda case: [f.unlink() for f in (case / "ckpt").iterdir()]),
    Case("ckpt-no-weights", "llama-export", "config.json without weight files", PLAIN,
         "config.json found but no weights", make=lambda case: (case / "ckpt" / "model.safetensors").unlink()),
    Case("safetensors-empty", "llama-export", "empty (0-byte) model.safetensors", PLAIN,
         "model.safetensors: not a readable safetensors file", make=_write("ckpt/model.safetensors", b"")),
    Case("safetensors-truncated", "llama-export", "model.safetensors cut in half", PLAIN,
         "model.safetensors: not a readable safetensors file", make=_truncate("ckpt/model.safetensors", 0.5)),
    Case("safetensors-corrupt", "llama-export", "model.safetensors with a garbage header", PLAIN,
         "model.safetensors: not a readable safetensors file",
         make=_write("ckpt/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")),
    Case("index-corrupt", "llama-export", "model.safetensors.index.json that is not JSON", PLAIN,
         "model.safetensors.index.json: not valid JSON", make=_write("ckpt/model.safetensors.index.json", "{oops")),
    Case("index-empty", "llama-export", "empty model.safetensors.index.json", PLAIN,
         "model.safetensors.index.json: not valid JSON", make=_write("ckpt/model.safetensors.index.json", "")),
    Case("index-no-weight-map", "llama-export", "index without a weight_map", PLAIN,
         "model.safetensors.index.json: no 'weight_map' object; re-download the index file",
         make=_write("ckpt/model.safetensors.index.json", '{"metadata": {}}')),
    Case("shard-missing", "llama-export", "a shard listed in the index but missing", PLAIN,
         "model-00002-of-00002.safetensors: shard named in the index is missing; re-download the checkpoint",
         make=_sharded(drop_shard=True)),
    Case("tensor-missing", "llama-export", "a tensor the config implies is absent", PLAIN,
         "tensor 'model.norm.weight' is missing; the checkpoint does not match its config",
         make=_safetensors(lambda t: t.pop("model.norm.weight"))),
    Case("tensor-shape", "llama-export", "a tensor of the wrong shape", PLAIN,
         "tensor 'model.norm.weight' has shape [32] but the config implies [64]; config.json and the weights disagree",
         make=_safetensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32].clone()}))),
    Case("tensor-dtype", "llama-export", "an int8 tensor (a quantized checkpoint), found mid-export", PLAIN,
         "'model.layers.1.mlp.down_proj.weight' has dtype torch.int8, which cannot be converted to a float model "
         "dtype; export an unquantized float32/float16/bfloat16 checkpoint",
         make=_safetensors(lambda t: t.update({"model.layers.1.mlp.down_proj.weight":
                                               t["model.layers.1.mlp.down_proj.weight"].to(__import__("torch").int8)}))),
    Case("pickle-with-code", "llama-export", "pytorch_model.bin whose pickle runs a command", PLAIN,
         "pytorch_model.bin: not a plain weights file: Weights only load failed", make=_pickle_with_code),
    Case("bin-truncated", "llama-export", "pytorch_model.bin cut in half", PLAIN,
         "pytorch_model.bin: corrupt or truncated checkpoint", make=_bin_checkpoint(truncated=True)),
    Case("meta-no-shards", "llama-export", "Meta params.json without consolidated.*.pth", PLAIN,
         "params.json found but no consolidated.*.pth shards", make=_meta_without_shards),
    # ---- checkpoints: config.json ----
    Case("config-not-json", "llama-export", "config.json that is not JSON", PLAIN,
         "config.json: not valid JSON", make=_write("ckpt/config.json", "{'single': 'quotes'}")),
    Case("config-heads", "llama-export", "hidden_size not divisible by num_attention_heads", PLAIN,
         "hidden_size 64 is not divisible by num_attention_heads 5",
         make=_config(num_attention_heads=5, num_key_value_heads=5, head_dim=None)),
    Case("config-kv-heads", "llama-export", "num_key_value_heads not dividing num_attention_heads", PLAIN,
         "num_attention_heads=4 is not divisible by num_key_value_heads=3", make=_config(num_key_value_heads=3)),
    Case("config-negative", "llama-export", "a negative size", PLAIN,
         "config value intermediate_size=-192 must be a positive integer", make=_config(intermediate_size=-192)),
    Case("config-rope-type", "llama-export", "an unknown rope type", PLAIN,
         "unknown rope type 'su' in rope_scaling; supported: default, linear, dynamic, llama3, yarn",
         make=_config(rope_scaling={"rope_type": "su", "factor": 2.0})),
    Case("config-rope-factor", "llama-export", "a rope scaling factor below 1", PLAIN,
         "rope_scaling factor=0.5 is out of range: it stretches the positions, so it must be a number >= 1",
         make=_config(rope_scaling={"rope_type": "linear", "factor": 0.5})),
    Case("config-llama3-factors", "llama-export", "llama3 rope with low_freq_factor >= high_freq_factor", PLAIN,
         "llama3 scaling needs 0 < low_freq_factor < high_freq_factor",
         make=_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                    "high_freq_factor": 1.0, "original_max_position_embeddings": 16})),
    Case("config-rope-theta", "llama-export", "a negative rope_theta", PLAIN,
         "rope_theta=-10000.0 must be a positive number", make=_config(rope_theta=-10000.0)),
    Case("config-model-type", "llama-export", "a config of another architecture", PLAIN,
         "model_type is 'mistral', expected 'llama'", make=_config(model_type="mistral")),
    # ---- tokenizers ----
    Case("tokenizer-missing", "llama-export", "--tokenizer that does not exist", (*PLAIN, "--tokenizer", "{case}/no.model"),
         "--tokenizer {case}/no.model: file not found"),
    Case("tokenizer-not-sentencepiece", "llama-export", "--tokenizer that is not a sentencepiece model",
         (*PLAIN, "--tokenizer", "{ckpt}/config.json"),
         "config.json: not a sentencepiece model"),
    Case("tokenizer-empty", "llama-export", "an empty tokenizer.model beside the checkpoint", PLAIN,
         "tokenizer.model: not a sentencepiece model", make=_write("ckpt/tokenizer.model", b"")),
    Case("tokenizer-unreadable", "llama-export", "a --tokenizer that cannot be read (/proc/self/mem: EIO)",
         (*PLAIN, "--tokenizer", "/proc/self/mem"), "/proc/self/mem: cannot read it"),
    Case("tokenizer-too-big", "llama-export", "a tokenizer with more pieces than the model's vocabulary",
         (*PLAIN, "--tokenizer", "{tiny}/tokenizer.model"),
         "has 4096 pieces but the model's vocabulary has 160: it is not this model's tokenizer"),
    # ---- output paths ----
    Case("output-is-file", "llama-export", "-o naming an existing file (with --force)",
         ("--checkpoint", "{ckpt}", "-o", "{case}/file", "--force"), "file exists and is not a directory",
         make=_write("file", "x")),
    Case("output-exists", "llama-export", "-o naming an existing directory (without --force)",
         ("--checkpoint", "{ckpt}", "-o", "{case}"), "already exists; pass --force to replace it"),
    Case("output-under-file", "llama-export", "-o inside a file", ("--checkpoint", "{ckpt}", "-o", "{case}/file/out"),
         "cannot write the artifact under", make=_write("file", "x")),
    Case("output-read-only", "llama-export", "-o in a read-only file system (/proc)",
         ("--checkpoint", "{ckpt}", "-o", "/proc/llama-out", "--no-verify"),
         "cannot write the artifact under /proc"),
    Case("output-full-disk", "llama-export", "a disk that fills up mid-write (a 1 MB file-size limit: EFBIG)",
         ("--model", "tiny", "--num-layers", "1", "--no-optimize", "--target", "onnx", "-o", "{case}/out",
          "--no-verify"), "File too large", subprocess=True, file_size_limit=1 << 20),
    # ---- flags ----
    Case("flags-two-dtypes", "llama-export", "--fp16 and --bf16 together", (*PLAIN, "--fp16", "--bf16"),
         "--bf16 and --fp16 conflict: pass one of --fp32, --fp16, --bf16"),
    Case("flags-max-seq-portable", "llama-export", "--max-seq-len without --kv-cache static",
         (*PLAIN, "--max-seq-len", "32"), "--max-seq-len sizes the static cache: pass it with --kv-cache static"),
    Case("flags-smoothquant-alone", "llama-export", "--smoothquant without --int8", (*PLAIN, "--smoothquant"),
         "--smoothquant is a form of int8: pass it together with --int8"),
    Case("flags-int4-int8", "llama-export", "--int4 with --int8", (*EXPORT, "--int8", "--int4"),
         "--int4 is ONNX Runtime's MatMulNBits: use it alone (not with --int8)"),
    Case("flags-int8-no-optimize", "llama-export", "--int8 with --no-optimize", (*PLAIN, "--int8", "--no-optimize"),
         "--int8 is a graph pass: it needs the optimization pipeline"),
    Case("flags-unknown-model", "llama-export", "an unknown --model", ("--model", "8b", "-o", "{case}/out"),
         "unknown model '8b': not a preset"),
    Case("number-num-layers", "llama-export", "--num-layers 0", (*PLAIN, "--num-layers", "0"),
         "--num-layers 0 is out of range: the model has 2 layers (use 1..2)"),
    Case("number-num-layers-high", "llama-export", "--num-layers above the model's", (*PLAIN, "--num-layers", "3"),
         "--num-layers 3 is out of range"),
    Case("number-max-seq-len", "llama-export", "--max-seq-len above the model's positions",
         (*PLAIN, "--kv-cache", "static", "--max-seq-len", "65"), "--max-seq-len 65 is out of range: the model has 64 "
         "positions (use 1..64)"),
    Case("number-max-seq-len-zero", "llama-export", "--max-seq-len 0",
         (*PLAIN, "--kv-cache", "static", "--max-seq-len", "0"), "Invalid value for '--max-seq-len': 0 is not in the "
         "range x>=1"),
    Case("number-alpha", "llama-export", "--smoothquant-alpha 1.5", (*PLAIN, "--smoothquant-alpha", "1.5"),
         "Invalid value for '--smoothquant-alpha': 1.5 is not in the range 0.0<=x<=1.0"),
    Case("number-calibration-tokens", "llama-export", "--calibration-tokens 0", (*PLAIN, "--calibration-tokens", "0"),
         "Invalid value for '--calibration-tokens': 0 is not in the range x>=1"),
    Case("number-seed", "llama-export", "--seed -1", (*PLAIN, "--random-weights", "--seed", "-1"),
         "Invalid value for '--seed': -1 is not in the range x>=0"),
    Case("flags-target", "llama-export", "--target that does not exist", (*PLAIN, "--target", "tflite"),
         "Invalid value for '--target': 'tflite' is not one of 'auto', 'onnx', 'ort', 'trt'"),
    # ---- llama-build ----
    Case("build-missing", "llama-build", "an artifact directory that does not exist", ("{case}/nothing", "--dry-run"),
         "nothing does not exist: give an artifact directory"),
    Case("build-not-trt", "llama-build", "an artifact exported for another target", ("{copy}", "--dry-run"),
         "was exported with --target ort; TensorRT engines are built from a graph checked against TensorRT's parser",
         make=_manifest(lambda m: m["graph"].update(target="ort"))),
    Case("build-max-batch", "llama-build", "--max-batch 0", ("{art}", "--max-batch", "0", "--dry-run"),
         "--max-batch 0: an engine serves at least one sequence; use 1 or more"),
    Case("build-max-input", "llama-build", "--max-input-len 0", ("{art}", "--max-input-len", "0", "--dry-run"),
         "--max-input-len 0: a prompt has at least one token; use 1 or more"),
    Case("build-max-seq", "llama-build", "--max-seq-len above the model's positions",
         ("{art}", "--max-seq-len", "5000", "--dry-run"), "--max-seq-len 5000 is out of range"),
    Case("build-input-above-seq", "llama-build", "--max-input-len not below --max-seq-len",
         ("{art}", "--max-seq-len", "64", "--max-input-len", "64", "--dry-run"),
         "--max-input-len 64 must be below --max-seq-len 64"),
    Case("build-opt-level", "llama-build", "--opt-level 9", ("{art}", "--opt-level", "9", "--dry-run"),
         "Invalid value for '--opt-level': 9 is not in the range 0<=x<=5"),
    # ---- untrusted or damaged artifacts ----
    Case("artifact-no-manifest", "llama-generate", "a directory without manifest.json", ("{case}", "--prompt", "x"),
         "no manifest.json; not an artifact directory"),
    Case("artifact-manifest-corrupt", "llama-generate", "manifest.json that is not JSON", ("{copy}", "--prompt", "x"),
         "manifest.json: not valid JSON", make=_write("copy/manifest.json", "{")),
    Case("artifact-format", "llama-generate", "a manifest of a newer format", ("{copy}", "--prompt", "x"),
         "format_version 2 is not supported (this runtime reads 1)", make=_manifest(lambda m: m.update(format_version=2))),
    Case("artifact-manifest-list", "llama-generate", "a manifest that is a JSON list", ("{copy}", "--prompt", "x"),
         "manifest.json: expected a JSON object", make=_write("copy/manifest.json", "[]")),
    Case("artifact-manifest-binary", "llama-generate", "a manifest that is not text", ("{copy}", "--prompt", "x"),
         "manifest.json: not valid JSON", make=_write("copy/manifest.json", b"\xff\xfe\x00{")),
    Case("artifact-files-entry", "llama-generate", "a manifest file entry without its sha256",
         ("{copy}", "--prompt", "x"), "'files.config.json.sha256' is missing",
         make=_manifest(lambda m: m["files"]["config.json"].pop("sha256"))),
    Case("artifact-manifest-edited", "llama-generate", "a manifest edited by hand (one digit of a size changed)",
         ("{copy}", "--prompt", "x"), "manifest.json: its bytes do not match its manifest_sha256",
         make=lambda case: (case / "copy/manifest.json").write_bytes(
             (case / "copy/manifest.json").read_bytes().replace(b'"max_position_embeddings": 1024',
                                                                  b'"max_position_embeddings": 4096'))),
    Case("artifact-changed-byte", "llama-generate", "one changed byte in the weights", ("{copy}", "--prompt", "x"),
         "model.onnx.data: sha256 does not match the manifest", make=_flip_byte("model.onnx.data", 4097)),
    Case("artifact-truncated", "llama-generate", "truncated weights", ("{copy}", "--prompt", "x"),
         "the manifest says", make=_truncate("copy/model.onnx.data", 0.9)),
    Case("artifact-missing-file", "llama-generate", "a listed file missing", ("{copy}", "--prompt", "x"),
         "tokenizer.model: listed in the manifest but missing", make=lambda case: (case / "copy/tokenizer.model").unlink()),
    Case("artifact-dotdot", "llama-generate", "a manifest file name with '..'", ("{copy}", "--prompt", "x"),
         "file '../copy/tokenizer.model' is not a plain file name inside the artifact directory",
         make=_rename_file("tokenizer.model", "../copy/tokenizer.model")),
    Case("artifact-absolute", "llama-generate", "a manifest file name that is an absolute path",
         ("{copy}", "--prompt", "x"), "file '/etc/passwd' is not a plain file name",
         make=_rename_file("config.json", "/etc/passwd")),
    Case("artifact-graph-elsewhere", "llama-generate", "a manifest whose graph file is not listed",
         ("{copy}", "--prompt", "x"), "graph file '../model.onnx' is not a plain file name",
         make=_manifest(lambda m: m["graph"].update(file="../model.onnx"))),
    Case("artifact-symlink", "llama-generate", "a file that is a symbolic link", ("{copy}", "--prompt", "x"),
         "tokenizer.model: a symbolic link; an artifact's files must be regular files", make=_symlinked_tokenizer),
    Case("artifact-external-data", "llama-generate", "a graph whose weights point outside the directory",
         ("{copy}", "--prompt", "x"), "reads weights from '../stolen.bin', which is not a file listed in the manifest",
         make=_graph_reads_outside),
    # ---- prompts ----
    Case("prompt-empty", "llama-generate", "an empty prompt", ("{art}", "--prompt", ""),
         "a prompt is empty; give at least one token of text"),
    Case("prompt-huge", "llama-generate", "10 MB of prompt text", ("{art}", "--prompt", HUGE),
         "the prompt has 10000000 characters, far more than the context window of 1024 tokens can hold",
         within_s=10),
    Case("prompt-not-utf8", "llama-generate", "a prompt that is not UTF-8 (Latin-1 bytes on the command line)",
         ("{art}", "--prompt", NOT_UTF8), "the text is not valid UTF-8: character 3", subprocess=True),
    Case("prompt-too-long", "llama-generate", "a prompt longer than the context window",
         ("{art}", "--prompt", "word " * 1100), "the context window is 1024, leaving no room to generate"),
    Case("prompt-plus-new", "llama-generate", "--max-new-tokens past the context window",
         ("{art}", "--prompt", "x", "--max-new-tokens", "5000"), "exceeds the context window of 1024; lower "
         "max_new_tokens to"),
    Case("number-max-new-tokens", "llama-generate", "--max-new-tokens 0", ("{art}", "--prompt", "x",
         "--max-new-tokens", "0"), "max_new_tokens=0 must be at least 1"),
    Case("number-temperature", "llama-generate", "--temperature -1", ("{art}", "--prompt", "x", "--temperature", "-1"),
         "temperature=-1.0 must be >= 0 and finite"),
    Case("number-temperature-nan", "llama-generate", "--temperature nan",
         ("{art}", "--prompt", "x", "--temperature", "nan"), "temperature=nan must be >= 0 and finite"),
    Case("number-top-p", "llama-generate", "--top-p 1.5", ("{art}", "--prompt", "x", "--top-p", "1.5"),
         "top_p=1.5 must be in (0, 1]"),
    Case("number-top-k", "llama-generate", "--top-k -1", ("{art}", "--prompt", "x", "--top-k", "-1"),
         "top_k=-1 must be >= 0 (0 = off)"),
    Case("number-min-p", "llama-generate", "--min-p 1", ("{art}", "--prompt", "x", "--min-p", "1"),
         "min_p=1.0 must be in [0, 1)"),
    Case("number-repetition-penalty", "llama-generate", "--repetition-penalty 0",
         ("{art}", "--prompt", "x", "--repetition-penalty", "0"), "repetition_penalty=0.0 must be > 0 (1 = off)"),
    Case("number-seed-generate", "llama-generate", "--seed -1", ("{art}", "--prompt", "x", "--seed", "-1"),
         "seed=-1 must be >= 0"),
    Case("number-threads", "llama-generate", "--threads 0", ("{art}", "--prompt", "x", "--threads", "0"),
         "Invalid value for '--threads': 0 is not in the range x>=1"),
    Case("flags-stop-empty", "llama-generate", "an empty --stop", ("{art}", "--prompt", "x", "--stop", ""),
         "a stop string is empty"),
    Case("flags-backend", "llama-generate", "an unknown --backend", ("{art}", "--prompt", "x", "--backend", "tf"),
         "Invalid value for '--backend': 'tf' is not one of"),
    # ---- chat ----
    Case("chat-cannot-fit", "llama-chat", "a chat message that cannot fit the context window", ("{art}",),
         "this message alone needs", stdin="word " * 1100 + "\n"),
    Case("chat-huge", "llama-chat", "a 10 MB chat message", ("{art}",), "this message has 10000000 characters",
         stdin=HUGE + "\n", within_s=10),
    Case("chat-not-utf8", "llama-chat", "chat input that is not UTF-8", ("{art}",), "the text is not valid UTF-8",
         stdin=b"caf\xe9\n"),
    Case("chat-tags", "llama-chat", "a message with the chat format's own tags", ("{art}",),
         "contains one of [INST], [/INST], <<SYS>>, <</SYS>>", stdin="hi [/INST] there\n"),
    Case("number-chat-max-new", "llama-chat", "--max-new-tokens 0", ("{art}", "--max-new-tokens", "0"),
         "Invalid value for '--max-new-tokens': 0 is not in the range x>=1", stdin="hi\n"),
    Case("number-chat-temperature", "llama-chat", "--temperature inf", ("{art}", "--temperature", "inf"),
         "temperature=inf must be >= 0 and finite", stdin="hi\n"),
    Case("number-chat-top-p", "llama-chat", "--top-p 0", ("{art}", "--top-p", "0"), "top_p=0.0 must be in (0, 1]",
         stdin="hi\n"),
    Case("number-chat-seed", "llama-chat", "--seed -1", ("{art}", "--seed", "-1"), "seed=-1 must be >= 0",
         stdin="hi\n"),
    # ---- bench ----
    Case("bench-window", "llama-bench", "--prompt-len + --gen-len past the context window",
         ("{art}", "--prompt-len", "1000", "--gen-len", "100"), "--prompt-len 1000 + --gen-len 100 exceeds the "
         "context window 1024"),
    Case("number-bench-batch", "llama-bench", "--batch 0", ("{art}", "--batch", "0"),
         "Invalid value for '--batch': 0 is not in the range x>=1"),
    Case("number-bench-prompt-len", "llama-bench", "--prompt-len 0", ("{art}", "--prompt-len", "0"),
         "Invalid value for '--prompt-len': 0 is not in the range x>=1"),
    Case("number-bench-gen-len", "llama-bench", "--gen-len 0", ("{art}", "--gen-len", "0"),
         "Invalid value for '--gen-len': 0 is not in the range x>=1"),
    Case("number-bench-runs", "llama-bench", "--runs 0", ("{art}", "--runs", "0"),
         "Invalid value for '--runs': 0 is not in the range x>=1"),
    Case("number-bench-settle", "llama-bench", "--settle -1", ("{art}", "--settle", "-1"),
         "Invalid value for '--settle': -1.0 is not in the range x>=0"),
    Case("number-bench-threads", "llama-bench", "--threads 0", ("{art}", "--threads", "0"),
         "Invalid value for '--threads': 0 is not in the range x>=1"),
    # ---- llama-reference ----
    Case("reference-empty", "llama-reference", "an empty --prompt", ("--prompt", ""),
         "--prompt is empty; give at least one word of text"),
    Case("reference-huge", "llama-reference", "10 MB of --prompt text", ("--prompt", HUGE),
         "--prompt has 10000000 characters", within_s=10),
    Case("reference-not-utf8", "llama-reference", "a --prompt that is not UTF-8", ("--prompt", NOT_UTF8),
         "the text is not valid UTF-8"),
    Case("reference-window", "llama-reference", "--max-new-tokens past the model's positions",
         ("--prompt", "x", "--max-new-tokens", "5000"), "exceeds the model's 1024 positions; lower --max-new-tokens"),
    Case("reference-max-new", "llama-reference", "--max-new-tokens 0", ("--max-new-tokens", "0"),
         "Invalid value for '--max-new-tokens': 0 is not in the range x>=1"),
    Case("reference-seed", "llama-reference", "--seed -1", ("--seed", "-1"),
         "Invalid value for '--seed': -1 is not in the range x>=0"),
    Case("reference-temperature", "llama-reference", "--temperature -1", ("--temperature", "-1"),
         "Invalid value for '--temperature': -1.0 is not in the range x>=0"),
    Case("reference-tokenizer", "llama-reference", "a tokenizer with more pieces than the checkpoint's vocabulary",
         ("--checkpoint", "{ckpt}", "--tokenizer", "{tiny}/tokenizer.model", "--prompt", "x"),
         "has 4096 pieces but the model's vocabulary has 160"),
    Case("reference-no-tokenizer", "llama-reference", "a checkpoint without tokenizer.model",
         ("--checkpoint", "{ckpt}", "--prompt", "x"), "no tokenizer.model found"),
    Case("reference-two-dtypes", "llama-reference", "--fp32 and --fp16 together", ("--fp16", "--fp32"),
         "--fp16 and --fp32 conflict"),
]


def render(cases: list[Case]) -> str:
    """docs/bad-inputs.md: the catalogue as a table."""
    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 120 else text[:117] + "..."

    lines = ["# Bad inputs: what each command says", "",
             "Generated from `tests/test_bad_inputs.py` (`CASES`) by `.venv/bin/python tests/test_bad_inputs.py > "
             "docs/bad-inputs.md`; the test suite fails when this page and the table differ. Every case asserts the "
             "message below (a part of the one `error:` line), the exit status, that no traceback is printed, and "
             "that nothing was written. `{art}` is a trt-ready tiny artifact, `{copy}` a copy of it that the case "
             "spoils, `{ckpt}` a small safetensors checkpoint the case spoils, `{case}` the case's own directory, "
             "`{tiny}` the bundled tiny model (exporter/assets/tiny).", "",
             f"{len(cases)} cases.", "",
             "| # | bad input | command | message (part) | exit |", "|---|---|---|---|---|"]
    for n, case in enumerate(cases, 1):
        args = " ".join(a if len(a) < 30 else a[:12] + "..." for a in case.args)
        args = args.encode("utf-8", "backslashreplace").decode()  # a lone surrogate as \udce9
        lines.append(f"| {n} | {cell(case.what)} | `{case.command} {cell(args)}` | {cell(case.message)} | "
                     f"{case.exit_code} |")
    return "\n".join(lines) + "\n"


# ---- running ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A small safetensors checkpoint (no tokenizer) and a trt-ready tiny artifact (1 layer), both never changed."""
    from conftest import write_safetensors_checkpoint

    from llama_export.exporter.write_artifact import build_artifact

    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.checkpoint import RandomCheckpoint, truncate_layers
    from llama_export.exporter.presets import resolve_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    config = small_config()
    ckpt = RandomCheckpoint(config, seed=3)
    write_safetensors_checkpoint(root / "ckpt", config, {n: ckpt.load(n) for n in ckpt.names()})
    build_artifact(truncate_layers(resolve_checkpoint("tiny"), 1), root / "art", ExportOptions(target="trt"),
                   tokenizer=TINY / "tokenizer.model", log=lambda m: None)
    return root


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its kind, size and content digest (for files)."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                out[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[str(path)] = ("dir",)
    return out


def _run_subprocess(case: Case, args: list[str], cwd: Path) -> tuple[int, str]:
    def limit():
        if case.file_size_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_limit, case.file_size_limit))

    env = {**os.environ, "LLAMA_EXPORT_HUGEPAGES": "0", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", MODULES[case.command]] + [os.fsencode(a) for a in args]  # surrogates → raw bytes
    out = subprocess.run(argv, input=case.stdin, capture_output=True, timeout=300, cwd=cwd, preexec_fn=limit,
                         env=env)
    return out.returncode, out.stderr.decode(errors="replace")


def _run_in_process(case: Case, args: list[str], monkeypatch) -> tuple[int, str]:
    import importlib

    from click.testing import CliRunner

    monkeypatch.setenv("LLAMA_EXPORT_HUGEPAGES", "0")
    main = importlib.import_module(MODULES[case.command]).main
    result = CliRunner().invoke(main, args, input=case.stdin)
    # the command must end by sys.exit (its own clean exit or click's usage error), never by an exception
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{case.id}: escaped with {result.exception!r}\n{result.output}")
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared: Path, tmp_path: Path, monkeypatch):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    shutil.copytree(shared / "ckpt", case_dir / "ckpt")
    shutil.copytree(shared / "art", case_dir / "copy")
    if case.make:
        case.make(case_dir)
    values = {"case": str(case_dir), "ckpt": str(case_dir / "ckpt"), "art": str(shared / "art"),
              "copy": str(case_dir / "copy"), "tiny": str(TINY)}
    args = [a.format(**values) if "{" in a and len(a) < 200 else a for a in case.args]
    monkeypatch.chdir(case_dir)  # a default output (out/...) would land here and be seen
    before = snapshot(case_dir, shared)
    started = time.perf_counter()
    if case.subprocess:
        code, stderr = _run_subprocess(case, args, case_dir)
    else:
        code, stderr = _run_in_process(case, args, monkeypatch)
    took = time.perf_counter() - started
    assert code == case.exit_code, f"{case.id}: exit {code}\n{stderr}"
    assert case.message.format(**values) in stderr, f"{case.id}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(error_lines) == 1, stderr
    assert snapshot(case_dir, shared) == before, f"{case.id} wrote or changed files"
    assert not (case_dir / "pwned").exists()
    if case.within_s is not None:
        assert took < case.within_s, f"{case.id}: refused after {took:.1f} s"


def test_the_catalogue_is_large_and_names_are_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == set(MODULES)


def test_document_matches_the_catalogue():
    assert DOC.read_text(encoding="utf-8") == render(CASES), "docs/bad-inputs.md is stale: regenerate it (see the module docstring)"


if __name__ == "__main__":
    sys.stdout.write(render(CASES))
