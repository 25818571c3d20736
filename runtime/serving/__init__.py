"""Serving artifacts in Triton Inference Server: the model repository writer (`llama-triton`), the Python-backend
model that runs the in-flight batcher (`model.py`), the server's lifecycle (`llama-serve`) and an
OpenAI-compatible frontend over Triton's gRPC streaming. A deployment layer over the runtime: it never imports the
exporter or torch."""
