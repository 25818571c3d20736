"""Train the built-in `tiny` preset: a small Llama-2-architecture model and its tokenizer.

Text: the reStructuredText sources of the Python documentation in Debian's `python3-doc` package
(`apt-get install python3-doc`). Every 25th file is held out; a sample of that held-out text is
written next to the model for perplexity checks.

Tokenizer: sentencepiece BPE trained the Llama way (byte fallback, split digits, identity
normalisation, whitespace kept, dummy prefix, unk/bos/eos = 0/1/2).

    python examples/train_tiny.py --minutes 25 --out exporter/assets/tiny

writes config.json, model.safetensors (float16), tokenizer.model, heldout.txt and training.json.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import click
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from llama_export.exporter.config import LlamaConfig
from llama_export.exporter.model import LlamaForCausalLM

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ("tutorial", "howto", "faq", "reference", "library", "whatsnew")


def clean(rst: str) -> str:
    """Keep prose and code; drop reST directives, option lines and heading underlines."""
    lines = []
    for line in rst.splitlines():
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped.startswith(":") and stripped.endswith(":"):
            continue
        if stripped and len(set(stripped)) == 1 and stripped[0] in "=-~^*#+\"'`":
            continue
        line = re.sub(r":[a-z]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", line)  # :func:`x` -> x
        lines.append(line.replace("``", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def corpus() -> tuple[str, str]:
    if not DOCS.is_dir():
        raise click.ClickException(f"{DOCS} not found: run `apt-get install python3-doc` first")
    files = sorted(f for s in SECTIONS for f in (DOCS / s).rglob("*.rst.txt"))
    train = [clean(f.read_text(errors="replace")) for i, f in enumerate(files) if i % 25]
    held = [clean(f.read_text(errors="replace")) for i, f in enumerate(files) if not i % 25]
    return "\n\n".join(train), "\n\n".join(held)


def train_tokenizer(text: str, vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    lines = [line for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        max_sentencepiece_length=16, split_by_unicode_script=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2, max_sentence_length=16384, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def documents(text: str, sp: spm.SentencePieceProcessor) -> torch.Tensor:
    ids: list[int] = []
    for doc in text.split("\n\n\n") if "\n\n\n" in text else text.split("\n\n"):
        ids += [sp.bos_id()] + sp.encode(doc)
    return torch.tensor(ids, dtype=torch.long)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("exporter/assets/tiny"), show_default=True)
@click.option("--minutes", type=float, default=25.0, show_default=True, help="Wall-clock training budget.")
@click.option("--vocab-size", type=int, default=4096, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(out: Path, minutes: float, vocab_size: int, seq_len: int, batch: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    train_text, held_text = corpus()
    click.echo(f"corpus: {len(train_text) / 1e6:.1f} MB train, {len(held_text) / 1e6:.2f} MB held out")
    sp = train_tokenizer(train_text, vocab_size, out)
    data = documents(train_text, sp)
    click.echo(f"tokens: {len(data) / 1e6:.2f} M")
    (out / "heldout.txt").write_text(held_text[:200_000])

    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=sp.get_piece_size(), max_position_embeddings=1024,
                         rms_norm_eps=1e-5, torch_dtype="float16")
    model = LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * config.num_hidden_layers) if "o_proj" in name
                                             or "down_proj" in name else 1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    deadline, start, step, losses = time.time() + minutes * 60, time.time(), 0, []
    while time.time() < deadline:
        frac = (time.time() - start) / (minutes * 60)
        for group in opt.param_groups:  # short warm-up, then cosine decay over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,))
        x = torch.stack([data[s:s + seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            recent = sum(losses[-50:]) / 50
            click.echo(f"step {step}  loss {recent:.3f}  {(time.time() - start) / 60:.1f} min", err=True)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("inv_freq")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    report = {"steps": step, "tokens_seen": step * batch * seq_len, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "minutes": minutes, "corpus": "Debian python3-doc reST sources, every 25th file held out",
              "train_tokens": len(data)}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report))


if __name__ == "__main__":
    main()
