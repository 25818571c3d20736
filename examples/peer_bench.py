"""One peer's side of `examples/peers.py`: time prefill and decode on a checkpoint, print one JSON line.

Runs inside the peer's own virtual environment (it imports only that peer and numpy). The workload is
llama-bench's: `--batch` random prompts of `--prompt-len` tokens (the same seeds), one prefill, then
`--gen-len` decode steps, each a forward pass over one new token per row, greedy, never stopping early;
medians of `--runs` after a warm-up and `--settle` seconds (llama-bench's wait: runtime/bench.py). genai's
decode is a loop of single steps, so its median step is reported too (`decode_median_step_ms`, for the
bandwidth fraction `peers.py` computes).

  genai         onnxruntime-genai's generator on the model its builder wrote
  optimum       optimum's ORTModelForCausalLM (exported from the checkpoint on first use) .generate
  transformers  transformers' LlamaForCausalLM .generate (fp32, torch with --threads threads)

For the two `.generate` peers, prefill is a generate of one token and decode is the rest of a generate
of gen-len + 1 tokens (the extra token is the one the prefill's logits give).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(3, vocab, length) for _ in range(batch)])


def genai_runner(model_dir: Path, threads: int):
    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(model_dir))

    def run(ids: np.ndarray, gen_len: int) -> tuple[float, float, float]:
        params = og.GeneratorParams(model)
        total = ids.shape[1] + gen_len + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))  # the prefill forward pass
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        generator.generate_next_token()  # only samples the prefill's logits (timed as part of the decode)
        steps = [time.perf_counter() - start]
        for _ in range(gen_len):  # each runs the model on one token per row
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - start)
        return prefill, sum(steps), statistics.median(steps[1:])
    return run


def generate_runner(peer: str, model_dir: Path, work: Path, threads: int):
    import torch

    torch.set_num_threads(threads)
    if peer == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        exported = work / "optimum-model"
        if not (exported / "model.onnx").is_file():
            ORTModelForCausalLM.from_pretrained(model_dir, export=True, use_cache=True).save_pretrained(exported)
        model = ORTModelForCausalLM.from_pretrained(exported, session_options=options, use_cache=True)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def generate(ids: torch.Tensor, new: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - start

    def run(ids: np.ndarray, gen_len: int) -> tuple[float, float, None]:
        tensor = torch.from_numpy(ids.astype(np.int64))
        prefill = generate(tensor, 1)
        return prefill, max(generate(tensor, gen_len + 1) - prefill, 1e-9), None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=["genai", "optimum", "transformers"])
    parser.add_argument("model_dir", type=Path, help="genai: the builder's output; others: the HF checkpoint")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (optimum's export)")
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after loading and the warm-up, as llama-bench does (runtime/bench.py)")
    args = parser.parse_args()
    run = (genai_runner(args.model_dir, args.threads) if args.peer == "genai"
           else generate_runner(args.peer, args.model_dir, args.work, args.threads))
    run(prompts(args.batch, min(args.prompt_len, 8), args.vocab, 99), 2)  # warm-up
    time.sleep(args.settle)
    results = [run(prompts(args.batch, args.prompt_len, args.vocab, seed), args.gen_len) for seed in range(args.runs)]
    prefill = statistics.median(r[0] for r in results)
    decode = statistics.median(r[1] for r in results)
    report = {"peer": args.peer, "batch": args.batch, "prefill_ms": round(prefill * 1e3, 1),
              "decode_tokens_per_s": round(args.batch * args.gen_len / decode, 2),
              "runs": [[round(p * 1e3, 1), round(d, 3)] for p, d, _ in results]}
    if results[0][2] is not None:
        report["decode_median_step_ms"] = round(statistics.median(r[2] for r in results) * 1e3, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
