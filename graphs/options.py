"""What an export makes, as one value: the graph's float type, the target its passes are for, the quantization and the
KV cache. `ExportOptions` is checked when it is made (every refusal names the llama-export flags and the fix), then
read by the export, by the pass pipeline (`graphs.pipeline.plan`), for the manifest's weights label and for the
default output directory's name. Imports nothing heavy: llama-export checks its flags before loading torch or onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("onnx", "ort", "trt")
QUANTIZATIONS = ("none", "int8", "int4", "w8a8")  # w8a8: SmoothQuant, int8 weights and activations
KV_CACHES = ("portable", "static")
FLAGS = {"int8": "--int8", "int4": "--int4", "w8a8": "--int8 --smoothquant"}


class OptionsError(ValueError):
    """A combination of export options that cannot be exported; the message names the flags and the fix."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"
    target: str = "onnx"
    optimize: bool = True  # run the target's pass pipeline (False: the traced graph as it is)
    quantization: str = "none"
    kv_cache: str = "portable"
    max_seq_len: int | None = None  # the static cache's slots (None: the model's max_position_embeddings)
    smoothquant_alpha: float = 0.5

    def __post_init__(self):
        for name, value, allowed in (("dtype", self.dtype, DTYPES), ("target", self.target, TARGETS),
                                     ("quantization", self.quantization, QUANTIZATIONS),
                                     ("kv_cache", self.kv_cache, KV_CACHES)):
            if value not in allowed:
                raise OptionsError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.max_seq_len is not None and self.kv_cache != "static":
            raise OptionsError("--max-seq-len sizes the static cache: pass it with --kv-cache static")
        if self.quantization != "none" and not self.optimize:
            raise OptionsError(f"{FLAGS[self.quantization]} is a graph pass: it needs the optimization pipeline "
                               f"(drop --no-optimize)")
        if self.quantization == "int4" and self.target != "ort":
            raise OptionsError("--int4 is ONNX Runtime's MatMulNBits: use it with --target ort (TensorRT takes --int8)")
        if self.dtype == "bfloat16" and not self.optimize:
            raise OptionsError("--bf16 needs the optimization pipeline (drop --no-optimize): the traced graph splits "
                               "the rotary halves with SplitToSequence, which ONNX does not define for bfloat16")
        if self.kv_cache == "static" and not self.optimize:
            raise OptionsError("--kv-cache static is a graph pass: it needs the optimization pipeline "
                               "(drop --no-optimize)")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise OptionsError(f"--smoothquant-alpha {self.smoothquant_alpha} is out of range: use 0..1")

    @classmethod
    def from_flags(cls, *, int8: bool = False, int4: bool = False, smoothquant: bool = False,
                   **options) -> "ExportOptions":
        """From llama-export's quantization flags (--int8, --int4, --smoothquant) and the other options."""
        if smoothquant and not int8:
            raise OptionsError("--smoothquant is a form of int8: pass it together with --int8")
        if int8 and int4:
            raise OptionsError("--int4 is ONNX Runtime's MatMulNBits: use it alone (not with --int8)")
        quantization = "w8a8" if smoothquant else "int8" if int8 else "int4" if int4 else "none"
        return cls(quantization=quantization, **options)

    def slots(self, max_positions: int) -> int | None:
        """The static cache's slots for a model of `max_positions` positions (None: the portable cache)."""
        if self.kv_cache != "static":
            return None
        slots = self.max_seq_len if self.max_seq_len is not None else max_positions
        if not 1 <= slots <= max_positions:
            raise OptionsError(f"--max-seq-len {slots} is out of range: the model has {max_positions} positions "
                               f"(use 1..{max_positions})")
        return slots

    @property
    def weights_label(self) -> str:
        """The manifest's `graph.weights`: how the weights are stored."""
        return {"none": self.dtype, "int8": "int8 weight-only", "int4": "int4 weight-only (blocks of 32)",
                "w8a8": f"int8 SmoothQuant W8A8 (alpha {self.smoothquant_alpha})"}[self.quantization]

    def output_name(self, model: str) -> str:
        """The default artifact directory name for `model`, e.g. 7b-float16-int8-static-trt."""
        quant = {"none": "", "int8": "-int8", "int4": "-int4", "w8a8": "-w8a8"}[self.quantization]
        flavour = "-static" if self.kv_cache == "static" else ""
        return f"{model}-{self.dtype}{quant}{flavour}{'' if self.target == 'onnx' else '-' + self.target}"
