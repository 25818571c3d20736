"""The one-direction flow: graphs never imports torch; runtime never imports exporter."""

import ast
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llama_export.exporter import EXPORT_MODULES


def imported_after(statement: str) -> set[str]:
    """The modules imported after `statement` in a fresh interpreter: each by its full name and its top package."""
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return set(names) | {name.split(".")[0] for name in names}


PACKAGES = ("exporter", "graphs", "runtime")  # folders, installed as llama_export.<folder>


def first_party_imports() -> dict[str, set[tuple[str, str]]]:
    """Each module of the three packages (its installed name) → the (module, name) pairs it imports from them."""
    root, found = Path(__file__).parents[1], {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            parts = parts[:-1] if is_package else parts
            base = parts if is_package else parts[:-1]  # the package a relative import starts from
            edges = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:
                        anchor = ["llama_export", *base][:len(base) + 2 - node.level]
                        module = ".".join(anchor + ([module] if module else []))
                    edges |= {(module, a.name) for a in node.names if module.startswith("llama_export.")}
                elif isinstance(node, ast.Import):
                    edges |= {(a.name, "") for a in node.names if a.name.startswith("llama_export.")}
            found["llama_export." + ".".join(parts)] = edges
    return found


def test_the_import_structure_flows_one_way_without_a_circle():
    """runtime and graphs import nothing of the other packages; exporter only their public names (the manifest
    through runtime.artifact_format); no module reads the manifest by key; no circle among the modules."""
    imports = first_party_imports()
    crossing = [(m, module, name) for m, edges in imports.items() for module, name in edges
                if module.split(".")[1] != m.split(".")[1]]
    assert not [c for c in crossing if c[0].split(".")[1] in ("runtime", "graphs")], crossing
    assert not [c for c in crossing if c[2].startswith("_")], crossing
    assert {c[1].split(".")[1] for c in crossing} <= {"runtime", "graphs"}
    root = Path(__file__).parents[1]
    by_key = [f"{p.relative_to(root)}:{n}" for package in PACKAGES for p in sorted((root / package).rglob("*.py"))
              for n, line in enumerate(p.read_text().splitlines(), 1) if 'manifest["' in line or "manifest.get(" in line]
    assert not by_key, by_key

    def target(module: str, name: str) -> str:
        return f"{module}.{name}" if f"{module}.{name}" in imports else module
    graph = {m: {target(*e) for e in edges} - {m} for m, edges in imports.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            assert state.get(nxt) != 1, f"import circle: {' → '.join(path + [module, nxt])}"
            if nxt in graph and nxt not in state:
                visit(nxt, path + [module])
        state[module] = 2
    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_graphs_never_imports_torch():
    assert "torch" not in imported_after("import llama_export.graphs.pipeline, llama_export.graphs.trt_check")


def test_runtime_never_imports_exporter():
    modules = imported_after("import llama_export.runtime.cli, llama_export.runtime.chat_cli, "
                             "llama_export.runtime.bench, llama_export.runtime.generation")
    assert not [m for m in modules if m.startswith("llama_export.exporter")] and "torch" not in modules


def test_export_commands_check_their_input_before_the_heavy_imports():
    """`--help` and a mistyped model or flag answer at once: torch, onnx and the graph passes load only after (of
    `graphs`, only its options, which import nothing heavy)."""
    modules = imported_after("import llama_export.exporter.cli, llama_export.exporter.reference_cli, "
                             "llama_export.exporter.presets")
    assert not {"torch", "onnx", "onnx_ir", "onnxscript"} & modules
    assert {m for m in modules if m.startswith("llama_export.graphs.")} == {"llama_export.graphs.options"}


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

    import llama_export.runtime.serving
    from llama_export.exporter.write_artifact import build_artifact
    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.reference_generate import generate as torch_generate
    from llama_export.exporter.loading import load_model
    from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
    from llama_export.runtime.tokenizer import LlamaTokenizer

    out = tmp_path / "tiny-static"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions(kv_cache="static", max_seq_len=64),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    prompt = "A list comprehension"
    ids = LlamaTokenizer(TINY_DIR / "tokenizer.model").encode(prompt)
    want = list(torch_generate(load_model(resolve_checkpoint("tiny")), ids, 12, eos_id=2))
    assert len(want) == 12 and 2 not in want  # no end-of-sequence in the way: twelve tokens to compare

    script = BLOCK + f"""
import json
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.generation import generate
from llama_export.runtime.inflight import InflightBatcher, Request
from llama_export.runtime.serving.repository import write_repository
from llama_export.runtime.tokenizer import LlamaTokenizer
import llama_export.runtime.cli, llama_export.runtime.chat_cli, llama_export.runtime.bench
import llama_export.runtime.load_bench, llama_export.runtime.parity, llama_export.runtime.serving.serve
artifact = Artifact.open({str(out)!r})
tokenizer = LlamaTokenizer(artifact.tokenizer_path)
solo = generate(open_backend(artifact, "ort", 1), tokenizer, [tokenizer.encode({prompt!r})], artifact.max_length,
                12)[0].tokens
with InflightBatcher.open({str(out)!r}, slots=2) as batcher:
    batched = batcher.submit(Request(prompt={prompt!r}, max_new_tokens=12)).result(60).tokens
write_repository(artifact.directory, {str(tmp_path / "repo")!r}, "llama", 2, 4, 1)
try:
    import llama_export.exporter
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

    model = Path(llama_export.runtime.serving.__file__).parent / "model.py"  # runs in Triton's stub, which we cannot import here
    imported = imported_modules(model)
    assert imported <= {"__future__", "json", "os", "queue", "threading", "time", "pathlib", "numpy",
                        "triton_python_backend_utils", "llama_export"}, imported


def test_export_commands_without_the_export_extra_say_how_to_install_it():
    code = BLOCK + "sys.argv = ['llama-export', '--model', 'tiny', '--fp32', '-o', 'x']\nfrom llama_export.exporter.cli import main\nmain()\n"
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
