"""`llama-parity`: an artifact against the PyTorch reference, per step, per layer, per precision; exits 0 pass,
1 fail, 2 bad input, so that a CI can gate on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llama_export.runtime.artifact import Artifact, ArtifactError
from llama_export.runtime.backends import BACKENDS

from .errors import ExportError

EXIT_FAIL, EXIT_BAD_INPUT = 1, 2


def _g(value: float) -> str:
    return f"{value:.3g}" if value == value else "nan"


def render(report: dict) -> str:
    """The readable table."""
    lines = [f"llama-parity {report['artifact']}",
             f"  {report['weights']} artifact (target {report['target']}, {report['flavour']} cache) on "
             f"{report['backend']}, against {report['reference']}; thresholds: {report['precision']}",
             f"  {len(report['prompt_tokens'])} prompts of {', '.join(map(str, report['prompt_tokens']))} tokens "
             f"(left-padded batch), prefill + {report['greedy_of'] - 1} teacher-forced decode steps", ""]
    header = f"  {'step':<10}{'max|Δ|':>9}{'mean|Δ|':>9}{'max rel':>9}{'KL mean':>9}{'KL max':>9}" \
             f"{'top-1':>7}{'top-5':>7}  KV rel (worst layer)"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for step in report["steps"]:
        m = step["logits"]
        kv = step.get("kv")
        worst = f"{_g(max(kv))} (layer {kv.index(max(kv))})" if kv else "n/a"
        lines.append(f"  {step['name']:<10}{_g(m['max_abs']):>9}{_g(m['mean_abs']):>9}{_g(m['max_rel']):>9}"
                     f"{_g(m['kl_mean']):>9}{_g(m['kl_max']):>9}{m['top1']:>7.3f}{m['top5']:>7.3f}  {worst}")
    lines += ["", f"  greedy tokens equal before the first divergence, per prompt: "
                  f"{', '.join(map(str, report['greedy_match']))} of {report['greedy_of']}"]
    layers = report.get("layers")
    if layers:
        errors = layers["errors"]
        items = errors.items() if isinstance(errors, dict) else enumerate(errors)
        lines.append(f"  per layer (prefill; {layers['method']}), relative L2 error of each decoder layer's output:")
        lines.append("    " + "  ".join(f"{k}: {_g(v)}" for k, v in items))
        first = layers["first_divergent"]
        lines.append(f"    first divergent layer: {first if first is not None else 'none'}")
    ppl = report.get("perplexity")
    if ppl:
        lines.append(f"  perplexity on {ppl['tokens']} tokens of {ppl['text']}: reference {ppl['reference']:.4g}, "
                     f"artifact {ppl['artifact']:.4g} ({ppl['rel_change']:+.3%})")
    t = report["thresholds"]
    lines.append(f"  thresholds ({report['precision']}): " + ", ".join(
        f"{k} {v:g}" for k, v in t.items() if v is not None))
    lines.append("")
    if report["passed"]:
        lines.append(f"PASS ({report['seconds']:.1f} s)")
    else:
        lines.append(f"FAIL ({report['seconds']:.1f} s):")
        lines += [f"  {why}" for why in report["failures"]]
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """Error per step (max |Δ logit|, mean KL, worst KV layer) and per layer (KV in the prefill, hidden states)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiny = 1e-12
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    names = [s["name"].replace("decode ", "d") for s in report["steps"]]
    x = range(len(names))
    left.semilogy(x, [max(s["logits"]["max_abs"], tiny) for s in report["steps"]], "o-", label="max |Δ logit|")
    left.semilogy(x, [max(s["logits"]["kl_mean"], tiny) for s in report["steps"]], "s-", label="mean KL")
    if all("kv" in s for s in report["steps"]):
        left.semilogy(x, [max(max(s["kv"]), tiny) for s in report["steps"]], "^-", label="KV rel (worst layer)")
    left.set_xticks(list(x), names, fontsize=7)
    left.set_title("per step", fontsize=9)
    left.legend(fontsize=7)
    prefill = report["steps"][0]
    if "kv" in prefill:
        right.semilogy(range(len(prefill["kv"])), [max(v, tiny) for v in prefill["kv"]], "^-", label="KV rel (prefill)")
    layers = report.get("layers")
    if layers:
        errors = layers["errors"]
        items = sorted((int(k), v) for k, v in errors.items()) if isinstance(errors, dict) else list(enumerate(errors))
        right.semilogy([k for k, _ in items], [max(v, tiny) for _, v in items], "o-", label="hidden rel (prefill)")
        right.axhline(report["thresholds"]["hidden_rel"], color="grey", linestyle=":", label="hidden threshold")
        right.set_xticks([k for k, _ in items])
    right.set_xlabel("decoder layer", fontsize=8)
    right.set_title("per layer", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(f"{Path(report['artifact']).name}: {report['precision']} on {report['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None, metavar="CHECKPOINT",
              help="Checkpoint directory to compare against [default: the checkpoint the manifest names].")
@click.option("--model", "model_name", default=None, metavar="NAME",
              help="A preset (tiny, 7b, …) to compare against, instead of --reference.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="What runs the artifact: ort (ONNX Runtime), trt (its TensorRT engine), torch (the reference "
                   "model on the artifact's weights).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text file, one prompt a line (chat models: through the chat template) [default: real "
                   "text: three passages of the bundled held-out text; three questions for a chat model].")
@click.option("--steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Teacher-forced decode steps after the prefill (both sides are fed the reference's token).")
@click.option("--per-layer", is_flag=True,
              help="Also compare each decoder layer's output in the prefill and name the first that diverges.")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text for the perplexity check [default: the bundled held-out text].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for ONNX Runtime and the PyTorch reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object instead of a table.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE.png",
              help="Write a PNG of the error per step and per layer.")
def main(directory, reference, model_name, backend, prompts_file, steps, per_layer, text, threads, as_json, plot):
    """Compare an artifact with the PyTorch float32 reference model: logits (max/mean |Δ|, relative, KL, top-1/5,
    greedy run) at the prefill of a left-padded batch and each teacher-forced decode step, the KV cache layer by
    layer, each decoder layer's output (--per-layer), and perplexity on a text, against thresholds for the
    artifact's precision (fp32, fp16, bf16, int8, int4, SmoothQuant; docs/parity.md).

    Exit status: 0 pass, 1 fail, 2 bad input.

    \b
    Examples:
      llama-parity out/tiny-float16-ort
      llama-parity out/tiny-float32-int8-ort --per-layer --plot parity.png
      llama-parity out/tiny-bfloat16-onnx --backend torch     # bf16: no ORT CPU kernels
      llama-parity out/7b-float16-trt --backend trt --reference ~/llama-2-7b-hf --json
    """
    from . import parity_run  # torch and the model: after the arguments are known good

    try:
        if reference is not None and model_name is not None:
            raise ExportError("--reference and --model both name the reference: pass one of them")
        if plot is not None and plot.suffix.lower() != ".png":
            raise ExportError(f"--plot {plot}: give a .png file name")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ExportError("--plot draws with matplotlib, which is not installed: "
                                  "pip install 'llama-export[plot]'") from None
        artifact = Artifact.open(directory, log=lambda m: click.echo(m, err=True))
        ckpt = parity_run.reference_checkpoint(artifact, reference, model_name)
        if artifact.tokenizer_path is None:
            raise ExportError(f"{directory}: the artifact has no tokenizer.model, which the prompts and the text "
                              f"need; re-export with --tokenizer PATH")
        from llama_export.runtime.tokenizer import LlamaTokenizer

        tokenizer = LlamaTokenizer(artifact.tokenizer_path)
        prompts = parity_run.read_prompts(prompts_file, artifact, tokenizer) if prompts_file \
            else parity_run.default_prompts(artifact, tokenizer)
        parity_run.check_prompts(prompts, artifact.config["vocab_size"], str(prompts_file or artifact.tokenizer_path))
        text_path = text or parity_run.HELDOUT
        limit = min(parity_run.PPL_TOKENS, artifact.max_length)
        ids = parity_run.text_ids(text_path, tokenizer, limit)
        request = parity_run.Request(artifact, ckpt, prompts, steps, backend, per_layer, ids,
                                     text_path.name if text is None else str(text_path), threads,
                                     log=lambda m: click.echo(m, err=True))
        parity_run.check_window(request, artifact.max_length)
        report = parity_run.run(request)
    except (ExportError, ArtifactError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        write_plot(report, plot)
    click.echo(json.dumps(report, indent=1) if as_json else render(report))
    sys.exit(0 if report["passed"] else EXIT_FAIL)


if __name__ == "__main__":
    main()
