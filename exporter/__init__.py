"""Checkpoint → reference PyTorch model → ONNX artifact."""
