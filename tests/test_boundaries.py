"""The one-direction flow: graphs never imports torch; runtime never imports exporter."""

import ast
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from exporter import EXPORT_MODULES


def imported_after(statement: str) -> set[str]:
    """The modules imported after `statement` in a fresh interpreter: each by its full name and its top package."""
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return set(names) | {name.split(".")[0] for name in names}


def test_graphs_never_imports_torch():
    assert "torch" not in imported_after("import graphs.pipeline, graphs.trt_check")


def test_runtime_never_imports_exporter():
    modules = imported_after("import runtime.cli, runtime.chat_cli, runtime.bench, runtime.generation")
    assert "exporter" not in modules and "torch" not in modules


def test_export_commands_check_their_input_before_the_heavy_imports():
    """`--help` and a mistyped model or flag answer at once: torch, onnx and the graph passes load only after (of
    `graphs`, only its options, which import nothing heavy)."""
    modules = imported_after("import exporter.cli, exporter.reference_cli, exporter.presets")
    assert not {"torch", "onnx", "onnx_ir", "onnxscript"} & modules
    assert {m for m in modules if m.startswith("graphs.")} == {"graphs.options"}


# ---- the base install: running an artifact needs no torch ------------------------------------------------------

# what only the export and test extras install (ml_dtypes is the export extra's too, but onnx, a base dependency,
# depends on it)
EXPORT_ONLY = tuple(m for m in EXPORT_MODULES if m != "ml_dtypes") + ("transformers", "matplotlib")
BLOCK = f"import sys\nfor _m in {EXPORT_ONLY!r}: sys.modules[_m] = None  # as if not installed\n"


def imported_modules(path: Path) -> set[str]:
    """The top-level names a Python file imports (`from .x` counts as "")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def test_the_base_install_declares_no_export_dependency():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements):  # module names are the distributions' canonical names with "_"
        return {canonicalize_name(Requirement(r).name).replace("-", "_") for r in requirements}

    base = names(project["dependencies"])
    assert not base & set(EXPORT_ONLY), base & set(EXPORT_ONLY)
    assert set(EXPORT_MODULES) <= names(project["optional-dependencies"]["export"])


def test_an_artifact_runs_with_the_export_modules_uninstalled(tmp_path):
    """llama-generate's path, the in-flight batcher and llama-triton's writer run with torch & co. unimportable,
    and give the PyTorch reference model's greedy tokens; the Triton model imports only the runtime."""
    import json

    import runtime.serving
    from exporter.write_artifact import build_artifact
    from graphs.options import ExportOptions
    from exporter.reference_generate import generate as torch_generate
    from exporter.loading import load_model
    from exporter.presets import TINY_DIR, resolve_checkpoint
    from runtime.tokenizer import LlamaTokenizer

    out = tmp_path / "tiny-static"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions(kv_cache="static", max_seq_len=64),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    prompt = "A list comprehension"
    ids = LlamaTokenizer(TINY_DIR / "tokenizer.model").encode(prompt)
    want = list(torch_generate(load_model(resolve_checkpoint("tiny")), ids, 12, eos_id=2))
    assert len(want) == 12 and 2 not in want  # no end-of-sequence in the way: twelve tokens to compare

    script = BLOCK + f"""
import json
from runtime.artifact import Artifact
from runtime.backends import open_backend
from runtime.generation import generate
from runtime.inflight import InflightBatcher, Request
from runtime.serving.repository import write_repository
from runtime.tokenizer import LlamaTokenizer
import runtime.cli, runtime.chat_cli, runtime.bench, runtime.load_bench, runtime.parity, runtime.serving.serve
artifact = Artifact.open({str(out)!r})
tokenizer = LlamaTokenizer(artifact.tokenizer_path)
solo = generate(open_backend(artifact, "ort", 1), tokenizer, [tokenizer.encode({prompt!r})], artifact.max_length,
                12)[0].tokens
with InflightBatcher.open({str(out)!r}, slots=2) as batcher:
    batched = batcher.submit(Request(prompt={prompt!r}, max_new_tokens=12)).result(60).tokens
write_repository(artifact.directory, {str(tmp_path / "repo")!r}, "llama", 2, 4, 1)
try:
    import exporter
    guard = None
except ImportError as err:
    guard = str(err)
print(json.dumps({{"solo": solo, "batched": batched, "guard": guard,
                  "loaded": sorted(m for m in {EXPORT_ONLY!r} if sys.modules.get(m) is not None)}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["solo"] == want and got["batched"] == want
    assert got["loaded"] == []
    assert "pip install 'llama-export[export]'" in got["guard"]
    assert (tmp_path / "repo" / "llama" / "config.pbtxt").is_file()

    model = Path(runtime.serving.__file__).parent / "model.py"  # runs in Triton's stub, which we cannot import here
    imported = imported_modules(model)
    assert imported <= {"__future__", "json", "queue", "threading", "time", "pathlib", "numpy",
                        "triton_python_backend_utils", "runtime"}, imported


def test_export_commands_without_the_export_extra_say_how_to_install_it():
    code = BLOCK + "sys.argv = ['llama-export', '--model', 'tiny', '--fp32', '-o', 'x']\nfrom exporter.cli import main\nmain()\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: exporting needs the export extra (torch, safetensors, huggingface_hub, onnxscript, onnx_ir, polygraphy "
        "not installed): pip install 'llama-export[export]' (running an artifact needs only the base install)"]


def test_no_test_module_imports_another():
    """Shared test code lives in conftest.py and the *_helpers.py modules, never in a test module."""
    offenders = [f"{path.name} imports {name}" for path in sorted(Path(__file__).parent.glob("*.py"))
                 for name in sorted(imported_modules(path)) if name.startswith("test_")]
    assert not offenders, offenders
