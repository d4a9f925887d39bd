"""Shared fixtures: Triton runs through its interpreter so the real kernels are tested on CPU."""

import os
import signal
import subprocess
import sys
from pathlib import Path

# Must be set before triton.jit decorates lorafast's kernels (when lorafast.kernels is imported). An exported value
# wins (bench/gpu.sh exports 0 to run test_cuda.py compiled); the interpreter-only modules then fail to collect
# (require_interpreter) instead of skipping.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lorafast.dropout
import lorafast.kernels

BACKENDS = ["torch", "triton"]


def require_interpreter() -> None:
    """Called at the top of the kernel test modules: a loud collection error, never a skip, where Triton is not
    interpreted (an exported ``TRITON_INTERPRET=0``). Those tests run CPU tensors through Triton's interpreter and
    cannot run as meant otherwise; the compiled kernels' tests are test_cuda.py's (bench/gpu.sh)."""
    if not lorafast.kernels.INTERPRETED:
        pytest.fail(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: this module tests the Triton kernels through "
            "Triton's interpreter on CPU tensors; unset TRITON_INTERPRET (or set it to 1), or run tests/test_cuda.py "
            "for the compiled kernels",
            pytrace=False,
        )


# The compiled kernels' tests need a GPU (bench/gpu.sh runs them); CPU runs do not collect them.
collect_ignore = [] if torch.cuda.is_available() else ["test_cuda.py"]

# (dtype, atol, rtol) against an fp32/fp64 reference computed from the same rounded inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, selected the way users select it."""
    monkeypatch.setenv("LORAFAST_BACKEND", request.param)
    return request.param


def assert_close_scaled(actual, expected, dtype=torch.float32, rel=None):
    """``assert_close`` at ``dtype``'s TOLERANCES (or ``rel`` for both), atol scaled by ``max(1, |expected|)``.

    Gradients of A and B sum over every token, so an absolute tolerance must grow with their magnitude.
    """
    atol, rtol = TOLERANCES[dtype] if rel is None else (rel, rel)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual - expected‖ / ‖expected‖`` in float64: scale-sensitive, unlike a cosine (a gradient twice too large
    is 1.0 off)."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def reference_lora(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """Naive LoRA linear under plain autograd: ``x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``."""
    dropped = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = x @ weight.T + scaling * (dropped @ lora_A.T) @ lora_B.T
    return y if bias is None else y + bias


def keep_mask(backend, seed, shape, p):
    """The dropout keep mask that ``backend`` derives from ``seed`` for a ``(rows, cols)`` input."""
    if backend == "triton":
        return lorafast.kernels.dropout_keep_mask(seed, shape, p, device="cpu")
    return lorafast.dropout.keep_mask(seed, shape, p)


def make_inputs(n_shape, in_f, out_f, r, dtype=torch.float32, bias=True, seed=0):
    """x ``(*n_shape, in_f)`` and frozen W, b with O(1) outputs, plus non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n_shape, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    lora_A = torch.randn(r, in_f, generator=g) / in_f**0.5
    lora_B = torch.randn(out_f, r, generator=g) / r**0.5
    to = lambda t: None if t is None else t.to(dtype)
    return to(x), to(weight), to(b), to(lora_A), to(lora_B)


RANK_CYCLE = [3, 8, 5, 1, 6, 2, 7, 4]  # different ranks per adapter, padded to the largest


def make_adapter_list(num_adapters, in_f, out_f, dtype=torch.float32, seed=0):
    """K adapters of ranks cycling through RANK_CYCLE: ``[(A_k (r_k, in), B_k (out, r_k), scaling_k)]``, leaves."""
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for k in range(num_adapters):
        r = RANK_CYCLE[k % len(RANK_CYCLE)]
        a = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype).requires_grad_()
        b = (torch.randn(out_f, r, generator=g) / r**0.5).to(dtype).requires_grad_()
        adapters.append((a, b, 0.5 + 0.75 * k))
    return adapters


# --- small BART models and real SumPubMed text (integration tests) ---------------------------------

# The SumPubMed sample beside the checkout; LORAFAST_SUMPUBMED points elsewhere (as in bench/).
SUMPUBMED = Path(os.environ.get("LORAFAST_SUMPUBMED", Path(__file__).resolve().parents[2] / "shared" / "sumpubmed"))


def sumpubmed_documents(count: int) -> list[tuple[str, str]]:
    """(article text, abstract) of the ``count`` lowest document ids of the shared SumPubMed sample."""
    ids = sorted(int(p.stem.rpartition("_")[2]) for p in (SUMPUBMED / "text").glob("text_*.txt"))[:count]
    if len(ids) < count:
        raise FileNotFoundError(f"{SUMPUBMED} holds {len(ids)} documents, the tests need {count}")
    read = lambda folder, name: (SUMPUBMED / folder / name).read_text(encoding="utf-8")
    return [(read("text", f"text_{i}.txt"), read("abstract", f"abstract_{i}.txt")) for i in ids]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained here on SumPubMed text (no hub access)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
    bpe = ByteLevelBPETokenizer()
    texts = [t for doc in sumpubmed_documents(200) for t in doc]
    bpe.train_from_iterator(texts, vocab_size=1000, min_frequency=2, special_tokens=specials, show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )  # fmt: skip


def tiny_bart(vocab_size: int = 1000, seed: int = 0):
    """A small BartForConditionalGeneration with random weights and no dropout of its own."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config)


def summarization_batches(tokenizer, count: int, batch_size: int = 4, source_len: int = 128, target_len: int = 48):
    """``count`` batches of real SumPubMed articles (inputs) and abstracts (labels)."""
    docs = sumpubmed_documents(count * batch_size)
    batches = []
    for start in range(0, len(docs), batch_size):
        texts, abstracts = zip(*docs[start : start + batch_size])
        batch = tokenizer(list(texts), max_length=source_len, truncation=True, padding=True, return_tensors="pt")
        labels = tokenizer(list(abstracts), max_length=target_len, truncation=True, padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        batches.append(dict(batch))
    return batches


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    """Run ``torchrun --standalone --nproc_per_node nproc *args`` on CPU (gloo); returns its output.

    The launcher gets a session of its own, so that a hang kills it and every rank, not the launcher
    alone. Fails the test (with the output's tail) unless every process exits with 0.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFAST_BACKEND": "torch"}
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
    assert launcher.returncode == 0, output[-3000:]
    return output
