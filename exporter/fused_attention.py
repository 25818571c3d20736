"""Which attention TensorRT can build as one fused kernel, and what `llama-build` does about the rest.

TensorRT's ONNX parser makes each `Attention` an `IAttention` that is *not* decomposable unless the node says
`TRT_decomposable` (onnx-tensorrt `onnxOpImporters.cpp`, `DEFINE_BUILTIN_OP_IMPORTER(Attention)`), so a build
fails when no fused kernel covers the layer. The coverage, from TensorRT's developer guide ("MHA fusion",
quoted by its maintainers in NVIDIA/TensorRT#2981; the `IAttention` docs defer to it):
- compute capability 7.5 or newer (bf16: 8.0, the first with bf16 tensor cores);
- the batched matmuls in fp16 or bf16 (int8 only with Q/DQ around them, which our graphs do not have):
  **no fp32 kernel**;
- head size 16 <= H <= 256 with H % 8 == 0.
tiny (H 32) and Llama 2 (H 128) in fp16/bf16 are covered; an fp32 artifact is not.

The choice: `llama-build` says up front whether the artifact is covered, and for one that is not it marks
every `IAttention` decomposable (BMM, softmax, BMM as separate kernels: slower, but it builds), rather than
refusing fp32 engines or writing a TensorRT-only attribute into the ONNX graph (ONNX's checker and ONNX
Runtime refuse unknown attributes of a standard operator).
"""

from __future__ import annotations

FUSED_DTYPES = ("float16", "bfloat16")
MIN_CAPABILITY = {"float16": (7, 5), "bfloat16": (8, 0)}
MIN_HEAD, MAX_HEAD, HEAD_MULTIPLE = 16, 256, 8


def uncovered(dtype: str, head_dim: int, capability: tuple[int, int] | None = None) -> str | None:
    """Why TensorRT has no fused attention kernel for this artifact (None: it has one). `capability` is the
    GPU's (major, minor) where known."""
    if dtype not in FUSED_DTYPES:
        return f"TensorRT has no fused attention kernel for {dtype} (only float16 and bfloat16)"
    if not (MIN_HEAD <= head_dim <= MAX_HEAD and head_dim % HEAD_MULTIPLE == 0):
        return (f"TensorRT's fused attention kernels take head sizes {MIN_HEAD}..{MAX_HEAD} in multiples of "
                f"{HEAD_MULTIPLE}; this model's is {head_dim}")
    if capability is not None and tuple(capability) < MIN_CAPABILITY[dtype]:
        need = ".".join(map(str, MIN_CAPABILITY[dtype]))
        return f"TensorRT's fused {dtype} attention needs compute capability {need}+, this GPU has " \
               f"{capability[0]}.{capability[1]}"
    return None


def describe(dtype: str, head_dim: int, capability: tuple[int, int] | None = None) -> str:
    """One line for the user: fused, or decomposed and why."""
    why = uncovered(dtype, head_dim, capability)
    if why is None:
        return f"attention: one fused TensorRT kernel per layer ({dtype}, head size {head_dim})"
    return f"attention: {why}; building it decomposable (matmul, softmax, matmul as separate kernels: slower)"


def make_decomposable(network, trt) -> int:
    """Mark every IAttention of a parsed network decomposable; returns how many. TensorRT 11 reaches an
    `IAttention` through its boundary layers (`LayerType.ATTENTION_OUTPUT`, property `attention`)."""
    marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != trt.LayerType.ATTENTION_OUTPUT:
            continue
        layer.__class__ = trt.IAttentionOutputLayer  # the Python bindings hand out the base ILayer
        layer.attention.decomposable = True
        marked += 1
    return marked
