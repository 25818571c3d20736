"""Interrupted and concurrent work: llama-export and llama-build killed in each phase, two exports to one -o.

A command is stopped in a known phase with the test hook of `exporter/staging.py` (`LLAMA_EXPORT_PAUSE_AT`: it
says "paused at phase ..." on stderr and waits), then signalled. Afterwards: no directory that looks complete;
SIGINT/SIGTERM remove the temporary directory and end with one `error:` line and status 128 + signal; what SIGKILL
leaves (a hidden `.NAME.partial-*` directory) is named and removed by the next run, which succeeds.

llama-build needs TensorRT to build, which this machine cannot install: its phases before the TensorRT import
(checking the artifact, planning the profiles) are the ones interrupted here, with --dry-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_export.exporter.staging import PHASES
from llama_export.runtime.artifact import Artifact

ROOT = Path(__file__).resolve().parent.parent
# a quick export that has every phase: the traced graph as it is (the phase hook pauses even where a phase has
# little to do: verifying with --no-verify, graph passes with --no-optimize)
EXPORT = ("--model", "tiny", "--num-layers", "1", "--no-optimize", "--target", "onnx", "--no-verify")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
# every phase gets SIGINT, SIGTERM (each ends in one line, its temporary directory removed) and SIGKILL
CLEAN = [(name, sig) for name in PHASES for sig in (signal.SIGINT, signal.SIGTERM)]


def start(module: str, args: list[str], pause_at: str | None = None, pause_s: float = 120) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLAMA_EXPORT_PAUSE_S": str(pause_s)}
    if pause_at:
        env["LLAMA_EXPORT_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-m", module, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def wait_for_pause(proc: subprocess.Popen, timeout: float = 300) -> list[str]:
    """stderr lines up to the hook's 'paused at phase' line."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("paused at phase"):
            return lines
    proc.kill()
    raise AssertionError("the command never paused:\n" + "".join(lines))


def finish(proc: subprocess.Popen, earlier: list[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(earlier) + err


def looks_complete(directory: Path) -> list[str]:
    """Directories under `directory` that a user (or llama-generate) would take for an artifact."""
    return [str(p.parent) for p in directory.rglob("manifest.json") if not p.parent.name.startswith(".")]


def test_export_interrupted_in_every_phase(tmp_path):
    """SIGINT and SIGTERM in each phase (ten exports at once); then SIGKILL in each phase, one after the other to
    the same -o: each run names and removes what the killed one before it left, and the last run succeeds."""
    clean = []
    for name, sig in CLEAN:
        where = tmp_path / f"{sig.name}-{name.replace(' ', '-')}"
        where.mkdir()
        clean.append((name, start("llama_export.exporter.cli", [*EXPORT, "-o", str(where / "out")], pause_at=name, pause_s=600),
                      sig, where))
    for name, proc, sig, where in clean:
        earlier = wait_for_pause(proc)
        proc.send_signal(sig)
        code, stderr = finish(proc, earlier)
        case = f"{sig.name} in {name}"
        assert code == 128 + sig, (case, stderr)
        assert "Traceback" not in stderr, (case, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: interrupted by {sig.name}; the unfinished artifact was removed (nothing "
                          f"written to -o)"], (case, stderr)
        assert list(where.iterdir()) == [], (case, sorted(where.iterdir()))
    killed = tmp_path / "killed"
    killed.mkdir()
    left = None  # the temporary directory the previous SIGKILL left
    for name in (*PHASES, None):
        proc = start("llama_export.exporter.cli", [*EXPORT, "-o", str(killed / "out")], pause_at=name)
        earlier = wait_for_pause(proc) if name else []
        if name:
            proc.send_signal(signal.SIGKILL)
        code, stderr = finish(proc, earlier)
        if left is not None:
            assert f"removed {left}, left by an export to {killed / 'out'} that was killed" in stderr, stderr
        if name is None:
            assert code == 0, stderr
            assert sorted(p.name for p in killed.iterdir()) == ["out"]
            Artifact.open(killed / "out")
            break
        assert code == -signal.SIGKILL, (name, stderr)
        assert not (killed / "out").exists() and looks_complete(killed) == [], name
        partial = [p for p in killed.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partial) == 1 and {p.name for p in killed.iterdir()} == {partial[0].name, ".out.lock"}, name
        left = partial[0]


@pytest.fixture(scope="module")
def trt_ready(tmp_path_factory):
    from llama_export.exporter.write_artifact import build_artifact
    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.checkpoint import truncate_layers
    from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint

    out = tmp_path_factory.mktemp("trt") / "art"
    build_artifact(truncate_layers(resolve_checkpoint("tiny"), 1), out, ExportOptions(target="trt"),
                   tokenizer=TINY_DIR / "tokenizer.model", log=lambda m: None)
    return out


def test_build_interrupted_in_each_phase_it_has_here(trt_ready):
    before = {p.name: p.read_bytes() for p in trt_ready.iterdir()}
    runs = {}
    for sig in SIGNALS:
        for name in ("checking", "profiles"):
            proc = start("llama_export.exporter.build_cli", [str(trt_ready), "--dry-run"], pause_at=name)
            runs[sig, name] = proc, wait_for_pause(proc)
            proc.send_signal(sig)
    for (sig, name), (proc, earlier) in runs.items():
        code, stderr = finish(proc, earlier)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 128 + sig and "Traceback" not in stderr, stderr
            assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
                f"error: interrupted by {sig.name}; {trt_ready} is as it was (no engine written)"], stderr
        assert {p.name: p.read_bytes() for p in trt_ready.iterdir()} == before, (sig, name)
    code, stderr = finish(start("llama_export.exporter.build_cli", [str(trt_ready), "--dry-run"]), [])
    assert code == 0, stderr


def test_two_exports_to_one_directory(tmp_path):
    """One export holds the output (paused with its files half made); a second to the same -o fails at once and
    clearly; the first then finishes, and the directory is wholly the first's. Then two started together: one
    wins, the other fails clearly, never a mix."""
    out = tmp_path / "out"
    first = start("llama_export.exporter.cli", [*EXPORT, "--verify", "-o", str(out)], pause_at="verifying")
    earlier = wait_for_pause(first)
    second = start("llama_export.exporter.cli", [*EXPORT, "--no-verify", "-o", str(out), "--force"])
    code, stderr = finish(second, [])
    assert code == 2 and "Traceback" not in stderr, stderr
    assert f"error: another llama-export (pid {first.pid}) is writing {out} right now; wait for it to finish, " \
           f"or choose another -o DIR" in stderr
    first.send_signal(signal.SIGUSR1)  # the hook's resume
    code, stderr = finish(first, earlier)
    assert code == 0, stderr
    assert "max_abs_logit_diff" in Artifact.open(out).manifest.verification  # the first's (verified)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    race = tmp_path / "race"
    procs = {flag: start("llama_export.exporter.cli", [*EXPORT, flag, "-o", str(race)]) for flag in ("--verify", "--no-verify")}
    results = {flag: finish(proc, []) for flag, proc in procs.items()}
    winners = [flag for flag, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    loser_code, loser_err = next(r for d, r in results.items() if d not in winners)
    assert loser_code == 2 and "Traceback" not in loser_err, loser_err
    assert "is writing" in loser_err or "already exists; pass --force" in loser_err, loser_err
    artifact = Artifact.open(race)  # every file matches the one manifest: the winner's alone
    assert ("skipped" in artifact.manifest.verification) == (winners[0] == "--no-verify")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "race"]
