"""Fault injection: crafted and damaged checkpoints, kill -9 mid-run, reused folders, bad numbers, bad adapters.

Nothing runs that should not, nothing is lost: every fault ends in a clear error or a warning, and the
files and models it touches stay as they were (or become exactly what an uninterrupted run gives).
"""

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import SUMPUBMED, tiny_bart
from lorafast import FusedLoRALinear, add_adapter, apply_lora, load_adapter, lora_layers, save_adapter
from lorafast.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train"
sys.path.insert(0, str(TRAIN))

import checkpoints  # noqa: E402
import finetune  # noqa: E402
import run_folder  # noqa: E402
import sumpubmed  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A SumPubMed release of the 16 lowest ids (12 of them in the train split)."""
    folder = tmp_path_factory.mktemp("release")
    ids = sorted(int(p.stem.rpartition("_")[2]) for p in (SUMPUBMED / "text").glob("text_*.txt"))[:16]
    for sub, pattern in [("text", "text_{}.txt"), ("abstract", "abstract_{}.txt"), ("shorter_abstract", "abst_{}.txt")]:
        (folder / sub).mkdir()
        for i in ids:
            shutil.copy(SUMPUBMED / sub / pattern.format(i), folder / sub / pattern.format(i))
    return folder


def _argv(data: Path, output_dir: Path, *extra) -> list[str]:
    """A tiny run: 8 documents, 2 a step, 6 steps over 2 epochs, a checkpoint every step."""
    return [
        "--data", str(data), "--model", "random:tiny", "--max-source-length", "24", "--max-target-length", "12",
        "--eval-docs", "0", "--max-docs", "8", "--batch-size", "2", "--epochs", "2", "--max-steps", str(STEPS),
        "--save-every", "1", "--output-dir", str(output_dir), *extra,
    ]  # fmt: skip


def _train(data, output_dir, *extra, on_step=None):
    return finetune.train(finetune.parse_args(_argv(data, output_dir, *extra)), on_step=on_step)


def _losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run_folder.read_log(output_dir) if "loss" in r}


def _adapter(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = output_dir / "adapter"
    return json.loads((folder / CONFIG_NAME).read_text()), load_file(folder / WEIGHTS_NAME)


def _assert_same_run(got: Path, want: Path) -> None:
    """The same losses, bit for bit, each step logged once, and the same adapter, bit for bit."""
    steps = [r["step"] for r in run_folder.read_log(got) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert _losses(got) == _losses(want)
    (got_config, got_tensors), (want_config, want_tensors) = _adapter(got), _adapter(want)
    assert got_config == want_config and got_tensors.keys() == want_tensors.keys()
    assert all(torch.equal(got_tensors[k], want_tensors[k]) for k in want_tensors)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run (its tokenizer is reused by the others, so all train on the same tokens)."""
    output_dir = tmp_path_factory.mktemp("reference")
    _train(data, output_dir, "--keep-checkpoints", "3")
    return output_dir


def _copy_run(reference: Path, destination: Path) -> Path:
    shutil.copytree(reference, destination)
    return destination


def _run_main(argv, capsys) -> tuple[int, str]:
    """``finetune.main(argv)``: its exit code (0 when it returns) and stderr."""
    code = 0
    try:
        finetune.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# --- checkpoints: nothing unpickled, damage skipped -----------------------------------------------


def test_nothing_in_the_project_unpickles_arbitrary_objects():
    unsafe = re.compile(
        r"weights_only\s*=\s*False|\bpickle\.loads?\(|\bUnpickler\b|allow_pickle\s*=\s*True|\b(dill|joblib|cloudpickle)\b"
    )
    folders = ("lorafast", "train", "bench", "tests")
    sources = [p for folder in folders for p in (ROOT / folder).rglob("*.py") if p.name != "test_faults.py"]
    assert len(sources) > 20
    found = [f"{p.relative_to(ROOT)}: {m[0]}" for p in sources for m in unsafe.finditer(p.read_text())]
    for path in sources:  # and every torch.load outside the tests says weights_only=True
        if path.parent.name != "tests":
            for call in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text()):
                if "weights_only=True" not in call[0]:
                    found.append(f"{path.relative_to(ROOT)}: {call[0]}")
    assert found == []
    assert re.search(r"torch\.load\([^)]*weights_only=True", (TRAIN / "checkpoints.py").read_text())


class _RunsAShellCommand:
    """Unpickling this runs ``touch <marker>``: a crafted checkpoint's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_runs_nothing_and_is_a_clear_error(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "run" / "checkpoint-99"
    checkpoint.mkdir(parents=True)
    torch.save({"step": 99, "payload": _RunsAShellCommand(marker)}, checkpoint / checkpoints.STATE_NAME)
    (checkpoint / checkpoints.ARGS_NAME).write_text(json.dumps({"run_id": "x", "world_size": 1, "args": {}}))
    assert b"system" in (checkpoint / checkpoints.STATE_NAME).read_bytes()  # the payload is really in there
    code, err = _run_main(["--data", "nowhere", "--output-dir", str(tmp_path / "run"), "--resume"], capsys)
    assert not marker.exists()
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: skipping checkpoint-99, which cannot be loaded: UnpicklingError")
    assert lines[1].startswith("error: --resume: no checkpoint in") and len(lines) == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_bytes(path: Path) -> None:
    """Overwrite the first float32 storage of the file (a trained factor) with NaN bytes, in place."""
    raw = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    first = next(iter(state["trainable"].values())).flatten()[:4].numpy().tobytes()
    at = raw.find(first)
    assert at > 0
    raw[at : at + 16] = torch.full((4,), math.nan).numpy().tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "PytorchStreamReader|EOF|zip archive"),
        (_nan_bytes, "NaN or infinite"),
        (lambda path: (path.parent / checkpoints.ARGS_NAME).unlink(), "FileNotFoundError"),
    ],
    ids=["truncated", "nan-bytes", "no-run-args"],
)
def test_damaged_newest_checkpoint_resumes_from_the_previous(data, reference, tmp_path, capsys, damage, reason):
    run = _copy_run(reference, tmp_path / "run")
    newest = run_folder.numbered_checkpoints(run)[-1]
    assert newest.name == f"checkpoint-{STEPS - 1}"
    damage(newest / checkpoints.STATE_NAME)
    (run / "checkpoint-best").mkdir()  # names other than checkpoint-<int> are ignored, and kept
    (run / "checkpoint-7.bak").mkdir()
    capsys.readouterr()
    _train(data, run, "--resume", "--keep-checkpoints", "3")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping {newest.name}")
    assert re.search(reason, warnings[0]), warnings[0]
    _assert_same_run(run, reference)
    assert (run / "checkpoint-best").is_dir() and (run / "checkpoint-7.bak").is_dir()


def test_log_line_cut_by_a_kill_is_dropped(tmp_path):
    records = [{"event": "start", "step": 0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    (tmp_path / run_folder.LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')
    assert run_folder.read_log(tmp_path) == records
    run_folder.trim_log(tmp_path, 1)
    assert (tmp_path / run_folder.LOG_NAME).read_text().splitlines() == [json.dumps(r) for r in records[:2]]


# --- kill -9 anywhere, then --resume: the uninterrupted run ---------------------------------------

# Kills its own process (SIGKILL, as kill -9) at the n-th call of one file operation, halfway through it
# where it writes or deletes; then runs the script.
_KILLER = r"""
import io, os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
import finetune

kind, n = sys.argv[2], int(sys.argv[3])
calls = 0

def half_save(obj, path, *a, **k):
    buffer = io.BytesIO()
    original(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])

def one_file_deleted(path, *a, **k):
    next(p for p in __import__("pathlib").Path(path).rglob("*") if p.is_file()).unlink()

module, name, partial = {
    "save": (torch, "save", half_save), "replace": (os, "replace", None), "fsync": (os, "fsync", None),
    "rmtree": (shutil, "rmtree", one_file_deleted),
}[kind]
original = getattr(module, name)

def faulty(*a, **k):
    global calls
    calls += 1
    if calls == n:
        if partial is not None:
            partial(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **k)

setattr(module, name, faulty)
finetune.main(sys.argv[4:])
"""

# (kind, n) ranges that kill while checkpoint 2..5 is written (3 os.replace, ~10 fsync, 1 torch.save each;
# rmtree deletes the oldest checkpoint at the 4th and 5th).
_KILL_POINTS = {"save": (2, 5), "replace": (4, 15), "fsync": (11, 45), "rmtree": (1, 2)}


def _script(argv, stderr: Path) -> subprocess.Popen:
    """Run Python with ``argv`` (as many threads as this process, so that the floats match), stderr to a file."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(stderr, "w") as err:
        return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=err)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_run(data, reference, tmp_path):
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kind = rng.choice(sorted(_KILL_POINTS))
    n = rng.randint(*_KILL_POINTS[kind])
    context = f"FAULT_SEED={seed}: killed at {kind} call {n}"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(reference / "tokenizer", run / "tokenizer")  # the same tokens as the reference run

    # 1. a fresh run, killed at an exact point inside a checkpoint write (or the rotation's delete)
    argv = ["-c", _KILLER, str(TRAIN), kind, str(n), *_argv(data, run, "--keep-checkpoints", "3")]
    first = _script(argv, tmp_path / "first.err")
    assert first.wait(timeout=300) == -signal.SIGKILL, f"{context}\n{(tmp_path / 'first.err').read_text()[-2000:]}"
    assert run_folder.numbered_checkpoints(run), context

    # 2. resumed, and killed from outside at a random moment once it trains again
    argv = [str(TRAIN / "finetune.py"), *_argv(data, run, "--resume", "--keep-checkpoints", "3")]
    second = _script(argv, tmp_path / "second.err")
    deadline = time.monotonic() + 300
    while second.poll() is None and time.monotonic() < deadline:
        if any(r.get("event") == "resume" for r in run_folder.read_log(run)):  # it trains again
            time.sleep(rng.uniform(0.0, 1.0))
            second.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code = second.wait(timeout=300)
    assert code in (0, -signal.SIGKILL), f"{context}; exit {code}\n{(tmp_path / 'second.err').read_text()[-2000:]}"

    # 3. resumed to the end
    _train(data, run, "--resume", "--keep-checkpoints", "3")
    _assert_same_run(run, reference)
    assert not list(run.glob(".*.tmp-*")), "temporary files of killed writes are cleaned up"


# --- the output folder ----------------------------------------------------------------------------


def test_reused_folder_is_refused_and_left_intact(data, reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path / "run")
    before = _snapshot(run)
    code, err = _run_main(_argv(data, run), capsys)
    assert code == 2 and err.startswith("error: --output-dir") and "--overwrite-output-dir" in err
    # an overwrite with bad data fails before deleting anything
    (tmp_path / "empty").mkdir()
    code, err = _run_main(_argv(tmp_path / "empty", run, "--overwrite-output-dir"), capsys)
    assert code == 2 and err.startswith("error: --data:") and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before

    # with --overwrite-output-dir the previous run goes, and only it: other files stay
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint-best").mkdir()
    _train(data, run, "--overwrite-output-dir", "--max-steps", "3", "--keep-checkpoints", "1")
    assert sorted(p.name for p in run_folder.numbered_checkpoints(run)) == ["checkpoint-2"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint-best").is_dir()
    assert list(_losses(run)) == [1, 2, 3]


def test_rotation_keeps_other_runs_checkpoints(data, reference, tmp_path):
    run = _copy_run(reference, tmp_path / "run")
    for step in (STEPS - 2, STEPS - 1):
        shutil.rmtree(run / f"checkpoint-{step}")  # resume from checkpoint-3: checkpoints 4 and 5 are written again
    foreign = run / "checkpoint-1"
    shutil.copytree(run / f"checkpoint-{STEPS - 3}", foreign)
    (foreign / checkpoints.ARGS_NAME).write_text(json.dumps({"run_id": "another", "world_size": 1, "args": {}}))
    _train(data, run, "--resume", "--keep-checkpoints", "1")
    assert [p.name for p in run_folder.numbered_checkpoints(run)] == ["checkpoint-1", f"checkpoint-{STEPS - 1}"]
    _assert_same_run(run, reference)


@pytest.mark.parametrize(
    "change,named",
    [
        (["--r", "4"], "--r 8 (now 4)"),
        (["--method", "peft"], "--method 'lorafast' (now 'peft')"),
        (["--target-modules", "q_proj"], "--target-modules ['q_proj', 'v_proj'] (now ['q_proj'])"),
        (["--max-docs", "6"], "--max-docs 8 (now 6)"),
        (["--alpha", "8", "--dropout", "0"], "--alpha 16 (now 8.0), --dropout 0.1 (now 0.0)"),
    ],
)
def test_resume_with_other_arguments_is_refused_by_name(data, reference, tmp_path, capsys, change, named):
    run = _copy_run(reference, tmp_path / "run")
    before = _snapshot(run)
    code, err = _run_main([*_argv(data, run, "--resume"), *change], capsys)
    assert code == 2 and err.startswith("error: --resume:") and named in err, err
    assert _snapshot(run) == before


def test_data_path_spelled_differently_is_the_same_run(data, reference, tmp_path, monkeypatch):
    run = _copy_run(reference, tmp_path / "run")
    monkeypatch.chdir(data.parent)
    _train(Path(data.name), run, "--resume", "--keep-checkpoints", "3")  # relative path: same data
    _assert_same_run(run, reference)


def test_non_finite_loss_stops_before_anything_is_saved(data, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _run_main(_argv(data, run, "--lr", "1e30", "--keep-checkpoints", "5"), capsys)
    error = re.search(r"^error: the training loss is (nan|inf) at step (\d+); stopped before", err, re.MULTILINE)
    assert len(re.findall("error:", err)) == 1
    assert code == 2 and error, err
    failed = int(error[2])
    assert failed > 1
    assert list(_losses(run)) == list(range(1, failed))
    assert [p.name for p in run_folder.numbered_checkpoints(run)] == [f"checkpoint-{s}" for s in range(1, failed)]
    for directory in run_folder.numbered_checkpoints(run):
        checkpoints.read_checkpoint(directory)  # each loads: finite
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()


# --- arguments and user errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--max-steps", "-3"], "argument --max-steps: must be at least 1, got -3"),
        (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
        (["--max-docs", "-5"], "argument --max-docs: must be at least 1"),
        (["--eval-docs", "-1"], "argument --eval-docs: must be at least 0"),
        (["--save-every", "-1"], "argument --save-every: must be at least 0"),
        (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be at least 1"),
        (["--r", "0"], "argument --r: must be at least 1"),
        (["--alpha", "nan"], "argument --alpha: must be a finite number"),
        (["--dropout", "1"], r"argument --dropout: must be in \[0, 1\)"),
        (["--model-dropout", "-0.1"], r"argument --model-dropout: must be in \[0, 1\)"),
        (["--lr", "0"], "argument --lr: must be greater than 0"),
        (["--lr", "inf"], "argument --lr: must be a finite number"),
        (["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*32\)"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["--num-beams", "0"], "argument --num-beams: must be at least 1"),
        (["--resume", "--overwrite-output-dir"], "not allowed with argument"),
    ],
)
def test_bad_numbers_are_argparse_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.parse_args(["--data", "d", "--output-dir", "o", *bad])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_numeric_argument_is_range_checked(monkeypatch):
    import argparse

    import arguments

    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a: parsers.append(self) or parse(self, *a))
    finetune.parse_args(["--data", "d", "--output-dir", "o"])
    numeric = {a.dest for a in parsers[0]._actions if a.type in (int, float)}
    assert len(numeric) > 15 and numeric <= set(arguments.RANGES), numeric - set(arguments.RANGES)


def test_data_errors_are_one_error_line(tmp_path, capsys):
    for data in (tmp_path / "missing", tmp_path):  # missing; a folder with neither a release nor tables
        argv = ["--data", str(data), "--model", "random:tiny", "--output-dir", str(tmp_path / "o")]
        code, err = _run_main(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --data:"), err
        assert not (tmp_path / "o").exists()


def test_garbage_abstracts_are_skipped(tmp_path):
    for sub in ("text", "abstract", "shorter_abstract"):
        (tmp_path / sub).mkdir()
    for i, (text, abstract) in enumerate(
        [("a real article.", "a real abstract."), ("another article.", "\x00" * 50), ("one more.", "\x01\x02 # . ,")]
    ):
        (tmp_path / "text" / f"text_{i}.txt").write_text(text)
        (tmp_path / "abstract" / f"abstract_{i}.txt").write_text(abstract)
        (tmp_path / "shorter_abstract" / f"abst_{i}.txt").write_text("short.")
    documents, report = sumpubmed.load_release(tmp_path)
    assert [d.doc_id for d in documents] == ["0"] and dict(report.skipped) == {"empty": 2}
    assert sumpubmed.clean("cell\x00s grew\x7f.") == "cell s grew."


# --- load_adapter is all or nothing ---------------------------------------------------------------


def _state(model: nn.Module) -> dict:
    """Every tensor (parameters and buffers, by name), its requires_grad, and every module's type."""
    tensors = {n: (t.detach().clone(), t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()}
    return {"tensors": tensors, "modules": {n: type(m) for n, m in model.named_modules()}}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, grad) in before["tensors"].items():
        assert torch.equal(after["tensors"][name][0], tensor) and after["tensors"][name][1] == grad, name


def _adapter_dir(tmp_path: Path, r: int = 4) -> Path:
    model = apply_lora(tiny_bart(), r=r, alpha=8)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_()
    return save_adapter(model, tmp_path / f"adapter-r{r}")


def _edit_config(directory: Path, destination: Path, **changes) -> Path:
    shutil.copytree(directory, destination)
    config = json.loads((destination / CONFIG_NAME).read_text())
    (destination / CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    return destination


def _edit_tensor(directory: Path, destination: Path, edit) -> Path:
    shutil.copytree(directory, destination)
    tensors = load_file(destination / WEIGHTS_NAME)
    key = sorted(tensors)[-1]  # the last module's lora_B: only found late in a load
    tensors[key] = edit(tensors[key])
    save_file(tensors, destination / WEIGHTS_NAME)
    return destination


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda d, t: _edit_config(d, t, r=8), r"says r=8 for \S+ but"),
        (lambda d, t: _edit_config(d, t, r=4.9), "r must be a positive integer, got 4.9"),
        (lambda d, t: _edit_config(d, t, lora_alpha=math.nan), "lora_alpha must be a finite number"),
        (lambda d, t: _edit_config(d, t, lora_dropout=5.0), r"lora_dropout must be a number in \[0, 1\)"),
        (lambda d, t: _edit_tensor(d, t, lambda x: x.index_fill(0, torch.tensor([0]), math.nan)), "NaN or infinite"),
        (lambda d, t: _edit_tensor(d, t, lambda x: x[:-1]), "has shape"),
        (lambda d, t: _edit_tensor(d, t, lambda x: x[None]), "not a 2-D float matrix"),
    ],
    ids=["r-mismatch", "r-float", "alpha-nan", "dropout-5", "tensor-nan", "tensor-shape", "tensor-3d"],
)
@pytest.mark.parametrize("into", ["plain", "lora", "named"])
def test_failed_load_adapter_leaves_the_model_unchanged(tmp_path, corrupt, message, into):
    good = _adapter_dir(tmp_path)
    bad = corrupt(good, tmp_path / "bad")
    model = tiny_bart()
    if into == "lora":
        apply_lora(model, r=4)
    elif into == "named":
        add_adapter(model, "first", r=4)
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, bad, adapter_name="second" if into == "named" else None)
    _assert_unchanged(model, before)
    load_adapter(model, good, adapter_name="second" if into == "named" else None)  # the right one still loads


def test_strict_load_state_dict_needs_both_factors_or_neither():
    layer = FusedLoRALinear(12, 10, r=2)
    full = FusedLoRALinear(12, 10, r=2).state_dict()
    layer.load_state_dict({k: v for k, v in full.items() if not k.startswith("lora_")})  # a plain linear's
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"lora_B\""):
        layer.load_state_dict({k: v for k, v in full.items() if k != "lora_B"})
    model = nn.Sequential(FusedLoRALinear(12, 10, r=2), FusedLoRALinear(10, 4, r=2))
    state = {k: v for k, v in copy.deepcopy(model).state_dict().items() if k != "1.lora_A"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1\.lora_A\""):
        model.load_state_dict(state)


@pytest.mark.parametrize("change", ["lora_B", "lora_A", "alpha", "load_state_dict"])
def test_unmerge_takes_out_what_merge_added(change):
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 16, r=4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        if change == "alpha":
            layer.alpha = 32
        elif change == "load_state_dict":
            layer.load_state_dict({**layer.state_dict(), "lora_B": torch.randn(16, 4)})
        else:
            getattr(layer, change).mul_(3)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base, atol=1e-6, rtol=0)
    x = torch.randn(5, 24)
    want = x @ base.T + layer.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)  # the new factors act on the base weight


def test_save_adapter_failing_midway_leaves_the_previous_adapter(tmp_path, monkeypatch):
    directory = _adapter_dir(tmp_path, r=4)
    before = _snapshot(directory)
    model = apply_lora(tiny_bart(), r=2)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, directory)
    monkeypatch.undo()
    assert _snapshot(directory) == before and sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    save_adapter(model, directory)
    assert read_adapter(directory)[0]["r"] == 2
