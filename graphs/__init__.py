"""ONNX → ONNX passes (fusions, precision, quantization). Never imports torch."""
