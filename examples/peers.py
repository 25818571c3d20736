"""Side by side on one checkpoint: llama-export's runtime against onnxruntime-genai, optimum and transformers.

    .venv/bin/python examples/peers.py --model gqa-mid            # batch 1 and 4, 128 + 128 tokens, 2 threads
    .venv/bin/python examples/peers.py --model small --batch 1 --peers genai

It writes a random-weight Hugging Face checkpoint of Llama-2 shapes (`small`, `gqa-mid`), exports it with
llama-export (fp32: `--target ort`, and `--target ort --kv-cache static`), builds genai's model with its own
builder, and runs llama-bench's workload (batch B, 128 prompt tokens, 128 decode steps, greedy, one timed run
after a warm-up and llama-bench's 3 s `--settle`, which peer_bench.py waits too) on each system in turn, round
robin for `--runs` rounds (default 3) in this one run, the order reversed every other round, so that the shared
machine's drift falls on every system alike; the table gives medians. The peers live in virtual environments
of their own under WORK/venvs (genai 0.18's builder needs transformers 5, optimum-onnx needs transformers <
4.58); they are created on first use. The table gives decode tokens/s, prefill latency, and the ratios of
llama-export's best artifact to each system: decode tokens/s (above 1: ours is faster) and prefill latency (below
1: ours is faster). For the systems whose decode is a loop of single steps (ours and genai) it also gives the
fraction of the machine's read bandwidth their median step reaches, with llama-bench's probe
(`runtime.bench.BandwidthProbe`) read by this script before and after each system's run: the same bytes per step
(the weights but the embedding table, and the mean KV cache) for every system.

Pages: llama-bench restarts itself onto transparent huge pages (runtime/hugepages.py), and so does this script,
whose probe then reads the memory as llama-bench's does; the peers run as they come, without the tunable.
`--page-variants` adds our static artifact on 4 KiB pages (`ours-ort-static-4k`) and genai on huge pages
(`genai-huge`), to show which part of a difference the pages make.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from llama_export.runtime.bench import BandwidthProbe, bracketed_fractions
from llama_export.runtime.hugepages import pages_environ, relaunch_with_huge_pages

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    "gqa-mid": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                    num_key_value_heads=4),
}
VENVS = {"genai": ["onnxruntime-genai==0.18.*", "transformers>=5", "onnx-ir", "safetensors", "numpy", "sentencepiece"],
         "optimum": ["optimum-onnx[onnxruntime]==0.1.*", "transformers<4.58", "safetensors", "numpy"]}
PEER_VENV = {"genai": "genai", "optimum": "optimum", "transformers": "optimum"}
OURS = {"ours-ort": ["--target", "ort"],
        "ours-ort-static": ["--target", "ort", "--kv-cache", "static", "--max-seq-len", "512"]}


def say(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list, **kwargs) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stderr[-3000:]}")
    return result.stdout


def checkpoint(work: Path, model: str) -> Path:
    """config.json + model.safetensors of seeded random weights, the shapes of `model`."""
    import torch
    from safetensors.torch import save_file

    from llama_export.exporter.checkpoint import RandomCheckpoint
    from llama_export.exporter.config import LlamaConfig

    path = work / "checkpoint"
    if (path / "tokenizer_config.json").is_file():
        return path
    say(f"writing the {model} checkpoint (random weights) to {path}")
    config = LlamaConfig(**SHAPES[model], vocab_size=32000, max_position_embeddings=4096, torch_dtype="float32")
    ckpt = RandomCheckpoint(config, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({name: ckpt.load_as(name, torch.float32).contiguous() for name in ckpt.names()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    # genai's builder saves the checkpoint's tokenizer: a real 32000-piece Llama-family one where the test extras
    # are installed (mistral-common ships it), else tiny's
    try:
        import mistral_common

        shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    except ImportError:
        from llama_export.exporter.presets import TINY_DIR

        shutil.copyfile(TINY_DIR / "tokenizer.model", path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def venv(root: Path, name: str) -> Path:
    python = root / name / "bin" / "python"
    if not python.is_file():
        say(f"creating the {name} environment in {root / name} (first use: a few minutes)")
        run([sys.executable, "-m", "venv", root / name])
        run([python, "-m", "pip", "install", "-q", "torch==2.13.0"])
        run([python, "-m", "pip", "install", "-q", *VENVS[name]])
    return python


def main() -> None:
    relaunch_with_huge_pages()  # this script's probe reads the memory the way llama-bench's does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SHAPES), default="gqa-mid")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="+", choices=list(PEER_VENV), default=list(PEER_VENV))
    parser.add_argument("--ours", nargs="+", choices=list(OURS), default=list(OURS), help="our artifacts to run")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "peers")
    parser.add_argument("--page-variants", action="store_true",
                        help="also run our static artifact on 4 KiB pages (ours-ort-static-4k) and genai on "
                             "transparent huge pages (genai-huge): which part of a difference the pages make")
    args = parser.parse_args()
    work = args.work / args.model
    ckpt = checkpoint(work, args.model)
    pythons = {name: venv(args.work / "venvs", name) for name in {PEER_VENV[p] for p in args.peers}}
    for name, flags in OURS.items():
        if not (work / name / "manifest.json").is_file():
            say(f"llama-export → {work / name}")
            run([sys.executable, "-m", "llama_export.exporter.cli", "--checkpoint", ckpt, "--fp32", "--no-verify", "-o", work / name,
                 *flags], cwd=ROOT)
    genai_dir = work / "genai"
    if "genai" in args.peers and not (genai_dir / "genai_config.json").is_file():
        say(f"onnxruntime-genai's builder → {genai_dir}")
        run([pythons["genai"], "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", genai_dir, "-p", "fp32",
             "-e", "cpu", "-c", work / "genai-cache"])
    common = ["--prompt-len", args.prompt_len, "--gen-len", args.gen_len, "--runs", 1, "--threads", args.threads]
    runs: dict[tuple[str, int], list[dict]] = {}
    probe = BandwidthProbe(args.threads)
    reading = probe.read()[0]

    def measured(system: str, batch: int, cmd: list, **kwargs) -> None:
        nonlocal reading
        say(f"round {round_ + 1}/{args.runs}, batch {batch}: {system}")
        report = json.loads(run(cmd, **kwargs))
        before, reading = reading, probe.read()[0]
        if "bandwidth_fraction" in report:  # llama-bench's own figure, with its own probe
            report["llama_bench_bandwidth_fraction"] = report.pop("bandwidth_fraction")
        if "decode_median_step_ms" in report:  # the run's bandwidth against the readings either side of it
            per_step = report.get("bytes_per_step") or runs[(args.ours[0], batch)][-1]["bytes_per_step"]
            report["bandwidth_fraction"] = round(
                bracketed_fractions([per_step / report["decode_median_step_ms"] * 1e3], [before, reading])[1][0], 3)
        runs.setdefault((system, batch), []).append(report)

    for round_ in range(args.runs):  # round robin: every system once per round, so drift hits all alike
        for batch in args.batch:
            turns = []  # (system, command, extra arguments for run)
            for name in args.ours:  # llama-bench asks for huge pages itself
                bench = [sys.executable, "-m", "llama_export.runtime.bench", work / name, "--batch", batch, *common, "--json"]
                turns.append((name, bench, {"cwd": ROOT}))
                if args.page_variants and name == "ours-ort-static":
                    turns.append((f"{name}-4k", bench, {"cwd": ROOT, "env": pages_environ(False)}))
            for peer in args.peers:  # as they come: no tunable of ours
                model_dir = genai_dir if peer == "genai" else ckpt
                cmd = [pythons[PEER_VENV[peer]], ROOT / "examples" / "peer_bench.py", peer, model_dir, "--work", work,
                       "--vocab", 32000, "--batch", batch, *common]
                turns.append((peer, cmd, {"env": pages_environ(False)}))
                if args.page_variants and peer == "genai":
                    turns.append((f"{peer}-huge", cmd, {"env": pages_environ(True)}))
            for system, cmd, kwargs in turns if round_ % 2 == 0 else turns[::-1]:  # no system always goes first
                measured(system, batch, cmd, **kwargs)
    probe.close()
    rows = []
    for (system, batch), reports in runs.items():
        row = {"system": system, "batch": batch, "runs": len(reports)}
        for key in ("prefill_ms", "decode_tokens_per_s", "bandwidth_fraction", "llama_bench_bandwidth_fraction",
                    "bandwidth_fraction_of_peak", "kernel_read_ratio", "fraction_of_kernel_ceiling"):
            if key in reports[0]:
                row[key] = statistics.median(r[key] for r in reports)
                row[f"{key}_each"] = [r[key] for r in reports]
        rows.append(row)
    print(f"\n{args.model}, fp32, {args.prompt_len} + {args.gen_len} tokens, {args.threads} threads, "
          f"median of {args.runs} round-robin rounds\n")
    print(f"{'system':<16} {'batch':>5} {'decode tok/s':>13} {'prefill ms':>11} {'ours/this decode':>17} "
          f"{'ours/this prefill':>18} {'bandwidth fraction':>19}")
    for batch in args.batch:
        mine = [r for r in rows if r["batch"] == batch and r["system"] in OURS]
        best = max(mine, key=lambda r: r["decode_tokens_per_s"])
        quickest = min(r["prefill_ms"] for r in mine)
        for r in (r for r in rows if r["batch"] == batch):
            fraction = f"{r['bandwidth_fraction']:.3f}" if "bandwidth_fraction" in r else "-"
            print(f"{r['system']:<16} {batch:>5} {r['decode_tokens_per_s']:>13.2f} {r['prefill_ms']:>11.1f} "
                  f"{best['decode_tokens_per_s'] / r['decode_tokens_per_s']:>17.2f} "
                  f"{quickest / r['prefill_ms']:>18.2f} {fraction:>19}")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    say(f"rows written to {work / 'results.json'}")


if __name__ == "__main__":
    main()
