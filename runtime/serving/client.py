"""Client side of the model's interface: typed Triton inputs from plain Python values, for tritonclient's gRPC or
HTTP module (the OpenAI frontend, the examples and the benchmark build their requests with it)."""

from __future__ import annotations

import numpy as np

from . import interface

NUMPY = {"TYPE_STRING": np.object_, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_,
         "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64}
WIRE = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_BOOL": "BOOL",
        "TYPE_FP32": "FP32", "TYPE_UINT64": "UINT64"}


def infer_inputs(module, **values) -> list:
    """`module.InferInput`s (module: tritonclient.grpc or tritonclient.http) for the given inputs, each typed as
    the model declares it; a list or tuple is a tensor of several elements (stop strings, input_ids), None is
    left out. E.g. `infer_inputs(tritonclient.grpc, text_input="Hello", max_tokens=32, stream=True)`."""
    tensors = []
    for name, value in values.items():
        if value is None:
            continue
        dtype = interface.INPUTS[name][0]
        items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        if dtype == "TYPE_STRING":
            items = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
        array = np.asarray(items, dtype=NUMPY[dtype])
        tensor = module.InferInput(name, list(array.shape), WIRE[dtype])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def is_final(result) -> bool:
    """Whether a gRPC streaming result is its request's last (sent with enable_empty_final_response=True)."""
    return result.get_response().parameters["triton_final_response"].bool_param
