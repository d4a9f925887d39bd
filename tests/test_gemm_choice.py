"""The GEMM path selection (``lorafast.kernels.gemm_choice``) with an injected timer: it picks the faster path,
remembers it in-process and on disk, honours ``LORAFAST_GEMM`` and survives a corrupt cache file."""

import json
from contextlib import nullcontext

import pytest
import torch

from lorafast.kernels import gemm_choice
from lorafast.kernels.gemm_choice import GemmChooser, GemmKey

KEY = GemmKey("forward", 8192, 4096, 4096, 16, "bfloat16", True, False, "NVIDIA H100 80GB HBM3")
OTHER = GemmKey("dx", 8192, 4096, 4096, 16, "bfloat16", False, True, "NVIDIA H100 80GB HBM3")


class FakeTimer:
    """Seconds per candidate from a table; counts the calls."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.timed = []

    def __call__(self, fn):
        name = fn()
        self.timed.append(name)
        return self.seconds[name]


CANDIDATES = {"triton": lambda: "triton", "cublas": lambda: "cublas"}


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("LORAFAST_GEMM", raising=False)


@pytest.mark.parametrize("faster", ["triton", "cublas"])
def test_picks_the_faster_path(tmp_path, faster):
    slower = "cublas" if faster == "triton" else "triton"
    timer = FakeTimer({faster: 1.0e-3, slower: 1.2e-3})
    assert GemmChooser(tmp_path / "c.json", timer).choose(KEY, CANDIDATES) == faster
    assert sorted(timer.timed) == ["cublas", "triton"]


def test_caches_in_process_and_on_disk(tmp_path):
    file = tmp_path / "choices.json"
    timer = FakeTimer({"triton": 2.0, "cublas": 1.0})
    chooser = GemmChooser(file, timer)
    assert chooser.choose(KEY, CANDIDATES) == "cublas"
    assert chooser.choose(KEY, CANDIDATES) == "cublas"
    assert len(timer.timed) == 2  # measured once
    saved = json.loads(file.read_text())[KEY.text()]
    assert saved == {"path": "cublas", "seconds": {"triton": 2.0, "cublas": 1.0}}
    # a later process (or another rank) reuses the file without timing
    later_timer = FakeTimer({"triton": 0.5, "cublas": 1.0})
    later = GemmChooser(file, later_timer)
    assert later.choose(KEY, CANDIDATES) == "cublas"
    assert later_timer.timed == []
    # a new key is measured and added beside the old one
    assert later.choose(OTHER, CANDIDATES) == "triton"
    assert set(json.loads(file.read_text())) == {KEY.text(), OTHER.text()}


def test_keys_differ_by_each_field():
    fields = {"op": "dx", "m_bucket": 4096, "n": 11008, "k": 1024, "r_pad": 64, "dtype": "float16", "bias": False,
              "dropout": True, "device": "NVIDIA A100"}  # fmt: skip
    texts = {KEY.text()} | {GemmKey(**{**KEY.__dict__, name: value}).text() for name, value in fields.items()}
    assert len(texts) == len(fields) + 1


@pytest.mark.parametrize("mode", ["triton", "cublas"])
def test_honours_lorafast_gemm(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("LORAFAST_GEMM", mode)
    timer = FakeTimer({"triton": 1.0, "cublas": 2.0})
    chooser = GemmChooser(tmp_path / "c.json", timer)
    assert chooser.choose(KEY, CANDIDATES) == mode
    assert gemm_choice.choose_path(KEY, CANDIDATES, torch.device("cpu")) == mode
    assert timer.timed == [] and not (tmp_path / "c.json").exists()  # nothing measured, nothing cached


def test_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("LORAFAST_GEMM", "cutlass")
    with pytest.raises(ValueError, match="LORAFAST_GEMM='cutlass' is not one of auto, triton, cublas"):
        gemm_choice.forced_path()


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", json.dumps({KEY.text(): {"path": "cutlass"}})])
def test_survives_a_corrupt_cache_file(tmp_path, content):
    file = tmp_path / "choices.json"
    file.write_text(content)
    timer = FakeTimer({"triton": 1.0, "cublas": 3.0})
    unparsable = content in ("{not json", "")
    with pytest.warns(RuntimeWarning, match="unreadable GEMM choice cache") if unparsable else nullcontext():
        assert GemmChooser(file, timer).choose(KEY, CANDIDATES) == "triton"
    assert len(timer.timed) == 2
    assert json.loads(file.read_text()) == {KEY.text(): {"path": "triton", "seconds": {"triton": 1.0, "cublas": 3.0}}}


def test_an_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    timer = FakeTimer({"triton": 1.0, "cublas": 0.5})
    chooser = GemmChooser(blocker / "sub" / "choices.json", timer)  # its folder cannot be made
    with pytest.warns(RuntimeWarning, match="could not write the GEMM choice cache"):  # (and could not read it)
        assert chooser.choose(KEY, CANDIDATES) == "cublas"
    assert chooser.choose(KEY, CANDIDATES) == "cublas" and len(timer.timed) == 2


def test_default_cache_file_is_beside_tritons_cache(monkeypatch, tmp_path):
    import triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    path = gemm_choice.default_cache_file()
    assert path.parent == tmp_path / "lorafast" and triton.__version__ in path.name


def test_gemm_key_reads_the_operands():
    """Token count bucketed to a power of two, N and K from U ``(M, K)`` and V ``(K, N)``, the rank padded."""
    u = torch.empty(3000, 768, dtype=torch.bfloat16)
    weight = torch.empty(1024, 768, dtype=torch.bfloat16)
    key = gemm_choice.gemm_key("forward", u, weight.t(), torch.empty(3000, 5), None, 0.1)
    assert key == GemmKey("forward", 4096, 1024, 768, 16, "bfloat16", False, True, "cpu")


def _raises(error):
    def candidate():
        raise error

    return candidate


def test_fallback_a_failing_triton_candidate_loses_to_cublas(tmp_path):
    from triton.runtime.errors import OutOfResources

    candidates = {"triton": _raises(OutOfResources(245760, 232448, "shared memory")), "cublas": lambda: "cublas"}
    chooser = GemmChooser(tmp_path / "c.json", FakeTimer({"cublas": 5.0}))
    assert chooser.choose(KEY, candidates) == "cublas"
    saved = json.loads((tmp_path / "c.json").read_text())[KEY.text()]
    assert saved["seconds"] == {"cublas": 5.0} and "shared memory" in saved["failed"]["triton"]


def test_fallback_every_candidate_failing_raises_and_remembers_nothing(tmp_path):
    from triton.compiler.errors import CompilationError

    error = CompilationError(None, None, "no tf32 here")
    chooser = GemmChooser(tmp_path / "c.json", FakeTimer({}))
    with pytest.raises(CompilationError):
        chooser.choose(KEY, {"triton": _raises(error), "cublas": _raises(error)})
    assert chooser.choices == {} and not (tmp_path / "c.json").exists()
    with pytest.raises(ZeroDivisionError):  # a bug is no launch failure: it is raised, not counted as a loss
        chooser.choose(KEY, {"triton": _raises(ZeroDivisionError()), "cublas": lambda: "cublas"})


@pytest.mark.parametrize("remembered", [None, "cublas"])
def test_graph_capture_reuses_the_choice_made(tmp_path, monkeypatch, remembered):
    """Under CUDA graph capture nothing is timed: the choice already made for the key, else the fused kernel."""
    chooser = GemmChooser(tmp_path / "c.json", FakeTimer({}))
    if remembered:
        chooser.choices[KEY.text()] = {"path": remembered, "seconds": {remembered: 1.0}}
    monkeypatch.setattr(gemm_choice, "_CHOOSER", chooser)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gemm_choice.choose_path(KEY, CANDIDATES, torch.device("cuda", 0)) == (remembered or "triton")
    assert chooser.timer.timed == []
