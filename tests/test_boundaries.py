"""The one-direction flow: graphs never imports torch; runtime never imports exporter."""

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_graphs_never_imports_torch():
    assert "torch" not in imported_after("import graphs.pipeline, graphs.trt_check")


def test_runtime_never_imports_exporter():
    modules = imported_after("import runtime.cli, runtime.chat_cli, runtime.bench, runtime.generate")
    assert "exporter" not in modules and "torch" not in modules


def test_export_commands_check_their_input_before_the_heavy_imports():
    """`--help` and a mistyped model or flag answer at once: torch, onnx and the graph passes load only after."""
    modules = imported_after("import exporter.cli, exporter.reference_cli, exporter.presets")
    assert not {"torch", "onnx", "onnx_ir", "onnxscript", "graphs"} & modules
