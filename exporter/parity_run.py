"""Run an artifact beside the PyTorch reference and collect the parity figures of `runtime.parity`.

Prefill a left-padded batch of prompts, then N teacher-forced decode steps: both sides are fed the reference's
greedy token, so an early difference does not snowball. Each step: the logit figures and each layer's present
key/value. `per_layer`: each decoder layer's output in the prefill, from a temporary copy of the graph with
those tensors as extra outputs (ONNX Runtime), or one layer marked at a time, bisecting (TensorRT).
Perplexity of both on a text. The reference is the float32 model on the checkpoint the manifest names.

How the decoder layers' outputs are found in a graph (every target): the residual stream enters each decoder
layer's two normalisations and the final one, in graph order, 2·layers + 1 of them. A `RMSNormalization` reads
the stream as its input; ONNX Runtime's `SkipSimplifiedLayerNormalization` (the ort target) computes the
residual sum itself and gives it as its optional 4th output, which the copy names when the graph left it
empty. Layer i's output is the stream entering normalisation 2i + 2 (the next layer's input norm, or the final
norm).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from llama_export.runtime import parity
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.chat import chat_prompt_ids
from llama_export.runtime.generation import left_pad
from llama_export.runtime.tokenizer import LlamaTokenizer

from .checkpoint import Checkpoint, RandomCheckpoint, open_checkpoint, truncate_layers
from .config import LlamaConfig
from .errors import ExportError
from .loading import load_model
from .presets import PRESET_NAMES, TINY_DIR, preset_config, resolve_checkpoint

HELDOUT = TINY_DIR / "heldout.txt"
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings")
NORMS = {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
QUESTIONS = ("What is a list comprehension in Python?", "Explain what a context manager does.",
             "How do I read a file line by line?")
PPL_TOKENS = 512


# ---- the reference -----------------------------------------------------------------------------------------


def reference_checkpoint(artifact: Artifact, reference: Path | None = None, model: str | None = None) -> Checkpoint:
    """--reference, --model, else the checkpoint the manifest names; cut to the artifact's layers; its config
    must be the artifact's (ExportError naming the first field that differs, with both values)."""
    described = artifact.manifest.model
    if reference is not None:
        ckpt = open_checkpoint(reference)
    elif model is not None:
        ckpt = resolve_checkpoint(model)
    else:
        name, source = described.name or "", described.source or ""
        if described.random_weights:
            seed = re.search(r"seed (\d+)", source)
            config = preset_config(name) if name in PRESET_NAMES else \
                LlamaConfig.from_hf_dict(artifact.config, str(artifact.directory / "manifest.json"))
            ckpt = RandomCheckpoint(config, seed=int(seed.group(1)) if seed else 0)
        elif source and Path(source).is_dir():  # before the name: `--checkpoint DIR` leaves --model's default
            ckpt = open_checkpoint(source)
        elif name in PRESET_NAMES:
            ckpt = resolve_checkpoint(name)
        else:
            raise ExportError(f"{artifact.directory}: the manifest names the checkpoint {source or name!r}, which "
                              f"is not here; pass --reference CHECKPOINT or --model NAME")
    kept = artifact.config.get("num_hidden_layers")
    if isinstance(kept, int) and ckpt.config.num_hidden_layers > kept and described.num_layers_kept == kept:
        ckpt = truncate_layers(ckpt, kept)
    ours, theirs = ckpt.config.to_hf_dict(), artifact.config
    for key in CONFIG_FIELDS:
        if key in theirs and ours.get(key) != theirs[key]:
            raise ExportError(f"the reference {ckpt.source} has {key} = {ours.get(key)!r}, the artifact "
                              f"{artifact.directory} has {key} = {theirs[key]!r}: pass the checkpoint the artifact "
                              f"was exported from (--reference CHECKPOINT or --model NAME)")
    return ckpt


# ---- prompts -----------------------------------------------------------------------------------------------


def is_chat(artifact: Artifact) -> bool:
    described = artifact.manifest.model
    return "chat" in f"{described.name or ''} {Path(described.source or '').name}".lower()


def default_prompts(artifact: Artifact, tokenizer: LlamaTokenizer) -> list[list[int]]:
    """Real text: a chat model gets three questions through the chat template, others (tiny included) three
    passages of the bundled held-out text (tiny's: English technical prose it was not trained on), of 48, 32
    and 20 tokens."""
    if is_chat(artifact):
        return [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    paragraphs = [p for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if len(p) > 300]
    picks = (paragraphs[0], paragraphs[len(paragraphs) // 3], paragraphs[2 * len(paragraphs) // 3])
    return [tokenizer.encode(p)[:n] for p, n in zip(picks, (48, 32, 20))]


def read_prompts(path: Path, artifact: Artifact, tokenizer: LlamaTokenizer) -> list[list[int]]:
    """One prompt per line (UTF-8, blank lines skipped); through the chat template for a chat model."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"--prompts {path}: cannot read it ({err}); give a UTF-8 text file, one prompt a line") \
            from None
    lines = [line for line in lines if line]
    if not lines:
        raise ExportError(f"--prompts {path}: no prompt in it; give one prompt a line")
    if is_chat(artifact):
        return [chat_prompt_ids(tokenizer, [{"role": "user", "content": line}]) for line in lines]
    return [tokenizer.encode(line) for line in lines]


def text_ids(path: Path, tokenizer: LlamaTokenizer, limit: int) -> np.ndarray:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"--text {path}: cannot read it ({err}); give a UTF-8 text file") from None
    ids = tokenizer.encode(content[: limit * 16])[:limit]
    if len(ids) < 2:
        raise ExportError(f"--text {path}: fewer than 2 tokens; give a longer text")
    return np.array([ids], np.int64)


# ---- the artifact's cache ----------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # an OrtValue
        return x.numpy()
    return np.asarray(x)


def cache_arrays(backend, past, batch: int, length: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The first `length` positions of each layer's key and value, [batch, kv_heads, length, head_dim], from the
    cache object of whichever backend (None for a cache of a form this does not know)."""
    if isinstance(past, (list, tuple)):  # ort portable, torch
        return [(_np(k)[:, :, :length], _np(v)[:, :, :length]) for k, v in past]
    buffers = getattr(past, "buffers", None)
    if buffers is None:
        return None
    if getattr(past, "host", None):  # ort static: the numpy arrays the bound OrtValues wrap
        arrays = past.host
    elif buffers and isinstance(buffers[0], tuple):  # ort static on a device: OrtValue pairs
        arrays = [_np(value) for pair in buffers for value in pair]
    else:  # trt: per tensor a list of torch buffers; portable ones flat, `current` holding the past
        current = getattr(past, "current", 0)
        shape = (batch, backend.kv_heads, length, backend.head_dim)
        arrays = [_np(b[0]) if b[0].dim() == 4 else _np(b[current][:int(np.prod(shape))].view(shape))
                  for b in buffers]
    return [(a[:, :, :length], b[:, :, :length]) for a, b in zip(arrays[0::2], arrays[1::2])]


def compare_cache(ours, reference, mask: np.ndarray, keys_unpadded_only: bool) -> list[float]:
    """Per layer, the worse relative L2 error of key and value over the real positions."""
    real = mask.astype(bool)
    key_rows = real & (mask.all(1, keepdims=True) if keys_unpadded_only else True)
    mine, theirs, layer_of = {}, {}, {}
    for i, ((k, v), (rk, rv)) in enumerate(zip(ours, reference)):
        for kind, a, r, rows in (("key", k, rk, key_rows), ("value", v, rv, real)):
            name = f"{i}.{kind}"
            mine[name] = a.transpose(0, 2, 1, 3)[rows]
            theirs[name] = _np(r).transpose(0, 2, 1, 3)[rows]
            layer_of[name] = i
    errors = parity.layer_errors(parity.compare_tensors(mine, theirs), layer_of)
    return [errors[i] for i in range(len(ours))]


# ---- per layer ---------------------------------------------------------------------------------------------


def residual_outputs(model: onnx.ModelProto, layers: int) -> list[str]:
    """Names the output of each decoder layer in `model` (module docstring), naming the residual sum of a
    SkipSimplifiedLayerNormalization that left it empty; returns the names, layer by layer."""
    streams = []
    for node in model.graph.node:
        if node.op_type not in NORMS:
            continue
        if node.op_type.startswith("Skip"):
            while len(node.output) < 4:
                node.output.append("")
            if not node.output[3]:
                node.output[3] = f"parity.residual.{len(streams)}"
            streams.append(node.output[3])
        else:
            streams.append(node.input[0])
    if len(streams) != 2 * layers + 1:
        raise ExportError(f"found {len(streams)} normalisations in the graph, expected {2 * layers + 1} (two per "
                          f"layer and the final one): cannot find the decoder layers' outputs")
    return streams[2::2]


@contextlib.contextmanager
def graph_copy(graph_path: Path, names_of: Callable[[onnx.ModelProto], list[str]]):
    """A temporary copy of the graph with extra graph outputs: yields (its path, their names).

    ONNX Runtime refuses external data outside the model's directory, symlinks resolved, so the weights are
    hard-linked into a hidden sibling of the artifact (same filesystem; a hard link updates the data file's
    ctime, so the next `Artifact.open` hashes it again), or copied to the temporary directory where no link
    can be made."""
    model = onnx.load(str(graph_path), load_external_data=False)
    names = names_of(model)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    artifact_dir = graph_path.parent
    try:
        tmp = tempfile.TemporaryDirectory(prefix=f".{artifact_dir.name}.parity-", dir=artifact_dir.parent)
        link = os.link
    except OSError:
        tmp, link = tempfile.TemporaryDirectory(prefix="llama-parity-"), shutil.copyfile
    with tmp as directory:
        for data in artifact_dir.glob(f"{graph_path.name}.data*"):
            try:
                link(data, Path(directory) / data.name)
            except OSError:
                shutil.copyfile(data, Path(directory) / data.name)
        onnx.save(model, str(Path(directory) / graph_path.name))
        yield Path(directory) / graph_path.name, names


def graph_feed(session, artifact: Artifact, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> dict:
    """A prefill's inputs by name, for either flavour (portable: empty past; static: zeroed slots)."""
    batch, seq = ids.shape
    dtype = np.float16 if artifact.dtype == "float16" else np.float32
    slots = artifact.max_sequence_length
    feed = {"input_ids": ids, "position_ids": pos, "logits_to_keep": np.array(0, np.int64),
            "write_indices": np.zeros(batch, np.int64)}
    if slots:
        feed["attention_mask"] = np.pad(mask, ((0, 0), (0, slots - seq)))
    else:
        feed["attention_mask"] = mask
    cache = (batch, artifact.config["num_key_value_heads"], slots or 0, artifact.head_dim)
    out = {}
    for value in session.get_inputs():
        out[value.name] = feed[value.name] if value.name in feed else np.zeros(cache, dtype)
    return out


def ort_layer_outputs(artifact: Artifact, ids, mask, pos, threads: int | None) -> list[np.ndarray]:
    import onnxruntime as ort

    layers = artifact.config["num_hidden_layers"]
    with graph_copy(artifact.graph_path, lambda m: residual_outputs(m, layers)) as (path, names):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options,
                                       providers=["CPUExecutionProvider"])
        return session.run(names, graph_feed(session, artifact, ids, mask, pos))


def bisect_first(count: int, over: Callable[[int], bool]) -> int | None:
    """The first index in 0..count-1 for which `over` holds, assuming it holds for every later one once it holds
    (an error in the residual stream carries into every later layer); log2(count) + 1 calls."""
    low, high = 0, count  # the answer is in [low, high], `high` meaning none
    while low < high:
        middle = (low + high) // 2
        if over(middle):
            high = middle
        else:
            low = middle + 1
    return low if low < count else None


def trt_layer_error(artifact: Artifact, layer: int, ids, mask, pos, reference: np.ndarray, real) -> float:
    """Decoder layer `layer`'s output from a TensorRT engine of a graph copy with only that tensor marked as an
    extra output (marking all of them breaks TensorRT's fusions), against the reference's; relative L2."""
    from polygraphy.backend.trt import (CreateConfig, Profile, TrtRunner, engine_from_network,
                                        network_from_onnx_path)

    layers = artifact.config["num_hidden_layers"]
    with graph_copy(artifact.graph_path, lambda m: residual_outputs(m, layers)[layer:layer + 1]) as (path, names):
        import onnxruntime as ort  # only to read the graph's input list without TensorRT

        probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = graph_feed(probe, artifact, ids, mask, pos)
        del probe
        profile = Profile()
        for name, array in feed.items():
            if name == "logits_to_keep":
                profile.add(name, [0], [0], [0])
            else:
                profile.add(name, array.shape, array.shape, array.shape)
        network = network_from_onnx_path(str(path), strongly_typed=True)
        engine = engine_from_network(network, CreateConfig(profiles=[profile]))
        with TrtRunner(engine) as runner:
            out = runner.infer(feed)[names[0]]
    a, r = _np(out).astype(np.float64)[real], reference[real].astype(np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class Request:
    artifact: Artifact
    checkpoint: Checkpoint
    prompts: list[list[int]]
    steps: int = 8
    backend: str = "ort"
    per_layer: bool = False
    text: np.ndarray | None = None  # [1, n] token ids for perplexity
    text_name: str = ""
    threads: int | None = None
    log: Callable[[str], None] = field(default=lambda message: None)


def check_prompts(prompts: list[list[int]], vocab_size: int, source: str) -> None:
    if not all(prompts):
        raise ExportError(f"{source}: a prompt is empty; give at least one token a prompt")
    top = max(max(p) for p in prompts)
    if top >= vocab_size:
        raise ExportError(f"{source}: token id {top} is past the model's vocabulary of {vocab_size}: the artifact's "
                          f"tokenizer.model does not belong to this model; re-export with --tokenizer PATH")


def check_window(request: Request, window: int) -> None:
    longest = max(len(p) for p in request.prompts)
    if longest + request.steps > window:
        raise ExportError(f"--steps {request.steps}: the longest prompt ({longest} tokens) plus {request.steps} "
                          f"steps is past the artifact's context window of {window} positions; use --steps "
                          f"{max(window - longest, 0)} or less, or shorter prompts")


def run(request: Request) -> dict:
    """The parity report (a JSON-able dict, `passed` and `failures` included)."""
    started = time.perf_counter()
    artifact = request.artifact
    manifest = artifact.manifest
    precision = parity.precision_of(manifest)
    limits = parity.THRESHOLDS[precision]
    check_window(request, artifact.max_length)
    request.log(f"loading the artifact ({request.backend}) and the float32 reference ({request.checkpoint.source})")
    try:
        backend = open_backend(artifact, request.backend, request.threads)
    except ValueError as err:
        raise ExportError(str(err)) from None
    if request.threads:
        torch.set_num_threads(request.threads)
    model = load_model(request.checkpoint, "float32")
    keys_by_slot = artifact.flavour == "static" and manifest.graph.target == "ort"

    ids, mask, pos = left_pad(request.prompts)
    batch = len(request.prompts)
    hidden: list[torch.Tensor] = []  # the reference's decoder-layer outputs in the prefill (--per-layer)
    artifact_hidden: list[torch.Tensor] = []  # the same, of the torch backend's model
    hooks = []
    if request.per_layer:
        watched = [(model, hidden)] + ([(backend.model, artifact_hidden)] if request.backend == "torch" else [])
        for watched_model, into in watched:
            hooks += [layer.register_forward_hook(lambda module, args, out, into=into: into.append(out[0].detach()))
                      for layer in watched_model.model.layers]
    steps, ours_top1, ref_top1 = [], [], []
    past, cache = backend.empty_cache(batch), None
    step_ids, keep = ids, 0
    request.log(f"prefill of {batch} prompts, then {request.steps} teacher-forced decode steps")
    for step in range(request.steps + 1):
        logits, past = backend.forward(step_ids, mask, pos, past, keep)
        logits = np.array(logits, copy=True)  # a static backend rewrites its array at the next step
        with torch.inference_mode():
            ref, cache = model(torch.from_numpy(step_ids), torch.from_numpy(mask), torch.from_numpy(pos),
                               past_key_values=cache, logits_to_keep=keep)
        ref = ref.numpy()
        if step == 0:
            for hook in hooks:
                hook.remove()
        real = mask[:, -ref.shape[1]:].astype(bool)
        record = {"name": "prefill" if step == 0 else f"decode {step}", "logits": parity.compare_logits(logits, ref, real)}
        arrays = cache_arrays(backend, past, batch, mask.shape[1])
        if arrays is not None:
            record["kv"] = compare_cache(arrays, cache, mask, keys_by_slot)
        steps.append(record)
        ours_top1.append(logits[:, -1].argmax(-1))
        chosen = ref[:, -1].argmax(-1)
        ref_top1.append(chosen)
        step_ids, keep = chosen.reshape(batch, 1).astype(np.int64), 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1

    report = {"artifact": str(artifact.directory), "precision": precision, "dtype": artifact.dtype,
              "weights": manifest.graph.weights, "target": manifest.graph.target,
              "flavour": artifact.flavour, "backend": request.backend,
              "reference": f"{request.checkpoint.source}, PyTorch float32",
              "prompt_tokens": [len(p) for p in request.prompts], "steps": steps,
              "overall": parity.overall(steps), "greedy_match": parity.greedy_run(ours_top1, ref_top1),
              "greedy_of": request.steps + 1,
              "thresholds": limits.as_dict()}
    failures = parity.judge(steps, limits)

    if request.text is not None:
        request.log(f"perplexity on {request.text.shape[1]} tokens of {request.text_name}")
        text = request.text
        n = text.shape[1]
        with torch.inference_mode():
            ref_logits, _ = model(torch.from_numpy(text))
        ours, _ = backend.forward(text, np.ones_like(text), np.arange(n)[None], backend.empty_cache(1), 0)
        ppl_ref, ppl_ours = parity.perplexity(ref_logits.numpy(), text), parity.perplexity(np.asarray(ours), text)
        change = ppl_ours / ppl_ref - 1
        report["perplexity"] = {"text": request.text_name, "tokens": n, "reference": ppl_ref, "artifact": ppl_ours,
                                "rel_change": change}
        if not abs(change) <= limits.ppl_rel:
            failures.append(f"perplexity: {ppl_ours:.4g} against the reference's {ppl_ref:.4g} "
                            f"({change:+.2%}; allowed ±{limits.ppl_rel:.2%})")
    del backend, past  # the per-layer graph copy loads the weights again: one ONNX Runtime copy at a time
    gc.collect()

    if request.per_layer:
        ids0, mask0, pos0 = left_pad(request.prompts)
        real = mask0.astype(bool)
        reference = [h.float().numpy() for h in hidden]
        request.log("per layer: each decoder layer's output in the prefill")
        if request.backend == "trt":
            errors: dict[int, float] = {}

            def over(layer: int) -> bool:
                errors[layer] = trt_layer_error(artifact, layer, ids0, mask0, pos0, reference[layer], real)
                request.log(f"  layer {layer}: relative error {errors[layer]:.3g}")
                return not errors[layer] <= limits.hidden_rel
            first = bisect_first(len(reference), over)
            layer_report = {"method": "TensorRT, one layer marked at a time, bisecting",
                            "errors": {str(k): v for k, v in sorted(errors.items())}}
        else:
            outputs = [h.float().numpy() for h in artifact_hidden] if request.backend == "torch" else \
                ort_layer_outputs(artifact, ids0, mask0, pos0, request.threads)
            found = parity.compare_tensors({str(i): o[real] for i, o in enumerate(outputs)},
                                           {str(i): r[real] for i, r in enumerate(reference)})
            error_list = [found[str(i)]["rel_l2"] for i in range(len(reference))]
            errors = dict(enumerate(error_list))
            bad = parity.first_over(errors, limits.hidden_rel)
            first = bad[0] if bad else None
            layer_report = {"method": "the torch backend's own layers" if request.backend == "torch" else
                            "ONNX Runtime, a graph copy with every decoder layer's output",
                            "errors": error_list, "max_abs": [found[str(i)]["max_abs"] for i in range(len(reference))]}
        layer_report["first_divergent"] = first
        report["layers"] = layer_report
        if first is not None:
            failures.append(f"per layer: layer {first} is the first whose output differs (relative error "
                            f"{errors[first]:.3g} > {limits.hidden_rel:g})")

    report["failures"] = failures
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
