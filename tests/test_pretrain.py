"""train/: BART's denoising corruption, pretraining on the training split only, pretrain → fine-tune."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SUMPUBMED

TRAIN = Path(__file__).resolve().parents[1] / "train"
sys.path.insert(0, str(TRAIN))

import denoising  # noqa: E402
import finetune  # noqa: E402
import lead_baseline  # noqa: E402
import pretrain  # noqa: E402
import summary_scoring  # noqa: E402
import sumpubmed  # noqa: E402

MASK, BOS, EOS = 4, 0, 2


@pytest.fixture(scope="module")
def documents():
    return sumpubmed.load_release(SUMPUBMED)[0]


# --- corruption ----------------------------------------------------------------------------------


def _spans(original: list[int], source: list[int]) -> list[int]:
    """The length of the span each mask replaced, for an original of consecutive ints."""
    lengths, previous = [], original[0] - 1
    for token in [*source, original[-1] + 1]:
        if token == MASK:
            lengths.append(None)
            continue
        if lengths and lengths[-1] is None:
            lengths[-1] = token - previous - 1
        else:
            assert token == previous + 1, "tokens went missing outside a mask"
        previous = token
    return lengths


@pytest.mark.parametrize("seed", range(20))
def test_infilling_masks_30_percent_in_separate_spans(seed):
    original = list(range(100, 140))  # 40 tokens: 12 masked
    source = denoising.infill_spans(original, MASK, np.random.default_rng(seed))
    lengths = _spans(original, source)
    assert sum(lengths) == 12 and source.count(MASK) == len(lengths)
    assert [t for t in source if t != MASK] == [t for t in original if t in source]  # order kept
    assert all(not (a == b == MASK) for a, b in itertools.pairwise(source))  # every span is one mask


def test_infilling_on_a_known_input():
    rng = np.random.default_rng(0)
    source = denoising.infill_spans([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], MASK, rng)
    # Poisson(3) from this seed: spans of 3 tokens (30 % of 10): one mask, 7 tokens kept around it
    assert source.count(MASK) >= 1 and len(source) == 10 - 3 + source.count(MASK)
    assert denoising.infill_spans(list(range(10)), MASK, rng, mask_ratio=0.0) == list(range(10))
    with pytest.raises(ValueError, match="mask_ratio"):
        denoising.infill_spans([1, 2], MASK, rng, mask_ratio=1.0)


def test_span_lengths_are_poisson_3_and_add_up():
    rng = np.random.default_rng(1)
    lengths = denoising.span_lengths(30_000, rng)
    assert sum(lengths) == 30_000
    body = np.array(lengths[:-1])  # the last one is cut to fit
    assert body.mean() == pytest.approx(3.0, abs=0.1) and body.var() == pytest.approx(3.0, abs=0.2)
    assert (body == 0).mean() == pytest.approx(np.exp(-3), abs=0.01)  # zero-length spans insert a mask


def test_sentence_permutation_and_the_denoising_pair():
    sentences = [[10, 11], [20], [30, 31, 32], [40]]
    rng = np.random.default_rng(3)
    orders = {tuple(map(tuple, denoising.permute_sentences(sentences, rng))) for _ in range(50)}
    assert all(sorted(order) == sorted(map(tuple, sentences)) for order in orders) and len(orders) > 10
    source, target = denoising.denoising_pair(
        sentences, np.random.default_rng(0), mask_id=MASK, bos_id=BOS, eos_id=EOS, mask_ratio=0.0
    )
    assert target == [BOS, 10, 11, 20, 30, 31, 32, 40, EOS]
    assert source[0] == BOS and source[-1] == EOS and sorted(source) == sorted(target)
    assert source != target  # permuted (this seed)
    masked, _ = denoising.denoising_pair(sentences, np.random.default_rng(0), mask_id=MASK, bos_id=BOS, eos_id=EOS)
    assert MASK in masked and len([t for t in masked if t != MASK]) == 2 + 7 - 2  # 30 % of 7 tokens is 2


def test_passage_takes_whole_sentences_that_fit():
    sentences = [[1] * 5, [2] * 4, [3] * 3]
    assert denoising.passage(sentences, 0, 9) == [[1] * 5, [2] * 4]
    assert denoising.passage(sentences, 1, 8) == [[2] * 4, [3] * 3]
    assert denoising.passage(sentences, 0, 3) == [[1] * 3]  # a longer first sentence is cut


# --- the training split only ---------------------------------------------------------------------


def test_pretraining_reads_only_training_documents(documents):
    texts = pretrain.training_texts(documents)
    held_out = [d for d in documents if sumpubmed.split_of(d.doc_id) != "train"]
    assert held_out and len(texts) == 2 * (len(documents) - len(held_out))
    corpus = set(texts)
    assert not any(d.text in corpus or d.summary.replace("\n", " ") in corpus for d in held_out)
    # changing a test document changes nothing the cached base depends on; a training one does
    test_doc = next(i for i, d in enumerate(documents) if sumpubmed.split_of(d.doc_id) == "test")
    train_doc = next(i for i, d in enumerate(documents) if sumpubmed.split_of(d.doc_id) == "train")
    fingerprint = pretrain.corpus_fingerprint(documents, "tiny", 300, 0)
    for index, same in ((test_doc, True), (train_doc, False)):
        changed = list(documents)
        changed[index] = sumpubmed.Document(documents[index].doc_id, documents[index].text + " more", "x")
        assert (pretrain.corpus_fingerprint(changed, "tiny", 300, 0) == fingerprint) is same


def test_make_batch_is_a_function_of_seed_and_step(documents):
    texts = pretrain.training_texts(documents[:20])
    sentences = pretrain.first_sentences(texts, 8)
    from bpe_tokenizer import train_tokenizer

    tokenizer = train_tokenizer([" ".join(s) for s in sentences], 600)
    corpus = pretrain.sentence_ids(tokenizer, sentences)
    preset = pretrain.PRESETS["micro"]
    a, b = (pretrain.make_batch(corpus, tokenizer, preset, 0, 5) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], pretrain.make_batch(corpus, tokenizer, preset, 0, 6)["labels"])
    assert a["labels"].shape[1] <= preset.max_length and (a["input_ids"] == tokenizer.mask_token_id).any()


# --- pretraining, resume, pretrain → fine-tune ---------------------------------------------------


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_pretraining_learns_and_resumes_exactly(tmp_path, documents):
    docs = sumpubmed.select_split(documents, "train")[:12]
    summary = pretrain.pretrain(docs, tmp_path / "whole", "micro", steps=8, save_every=3)
    assert summary["last_loss"] < summary["first_loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png", "pretrain.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    assert not (tmp_path / "whole" / "checkpoint").exists()

    class SimulatedCrashError(Exception):
        pass

    def crash(step, loss):
        if step == 5:  # after the checkpoint at step 3 and two more steps the resumed run redoes
            raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        pretrain.pretrain(docs, tmp_path / "parts", "micro", steps=8, save_every=3, on_step=crash)
    pretrain.pretrain(docs, tmp_path / "parts", "micro", steps=8, save_every=3, resume=True)
    assert _losses(tmp_path / "parts") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-5)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain.pretrain(docs, tmp_path / "none", "micro", steps=2, resume=True)


def test_pretrain_then_finetune_reuses_the_cached_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    common = [
        "--data", str(SUMPUBMED), "--model", "pretrained:micro", "--max-docs", "8", "--batch-size", "4",
        "--max-steps", "2", "--max-source-length", "64", "--max-target-length", "32", "--eval-docs", "2",
        "--num-beams", "2", "--gen-max-tokens", "12", "--split", "test",
    ]  # fmt: skip
    metrics = finetune.train(finetune.parse_args([*common, "--output-dir", str(tmp_path / "a")]))
    bases = list((tmp_path / "cache").iterdir())
    assert len(bases) == 1 and (bases[0] / "pretrain.json").is_file()
    assert metrics["steps"] == 2 and metrics["random_weights"] is False
    assert set(metrics["lead_rouge"]) == set(summary_scoring.ROUGE_TYPES) and "degenerate_summaries" in metrics
    assert "lead baseline: rouge1" in capsys.readouterr().out

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached base should be reused")

    monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
    again = finetune.train(finetune.parse_args([*common, "--output-dir", str(tmp_path / "b")]))
    assert again["rouge"] == metrics["rouge"]  # same base, seed and data: the same summaries
    assert "reusing" in capsys.readouterr().out


# --- summaries -----------------------------------------------------------------------------------


def test_repeated_phrases_mark_degenerate_summaries():
    assert summary_scoring.repeated_phrase("cep cep cep cep") == "cep"
    assert summary_scoring.repeated_phrase("we saw the cells of the cells of the cells of mice") == "the cells of"
    assert summary_scoring.repeated_phrase("the cells grew. the mice grew. the cells died.") is None
    assert summary_scoring.repeated_phrase("a a b b") is None


def test_lead_baseline_cuts_to_the_reference_length():
    text = "first sentence here. second one follows. third."
    assert lead_baseline.lead_summary(text, "one two three four five") == "first sentence here.\nsecond one"
    scores = lead_baseline.lead_rouge([text], ["first sentence here."])
    assert scores["rouge1"] == pytest.approx(100.0)


def test_reproduction_table_compares_each_run_with_full_finetuning(tmp_path):
    import reproduce

    def run(trainable, rouge_l, tokens_per_second, saved):
        rouge = {"rouge1": 30.0, "rouge2": 10.0, "rougeL": rouge_l, "rougeLsum": 28.0}
        return {"trainable_parameters": trainable, "rouge": rouge, "tokens_per_second": tokens_per_second,
                "peak_memory_bytes": 2**30, "saved_bytes": saved}  # fmt: skip

    results = {"full": run(1000, 20.0, 100.0, 4000), "lora-qv-r8": run(10, 18.0, 150.0, 40)}
    lead = {"rouge1": 40.0, "rouge2": 12.0, "rougeL": 19.0, "rougeLsum": 38.0}
    args = reproduce.parse_args(["--data", "x", "--output-dir", str(tmp_path), "--steps", "5", "--eval-docs", "3"])
    table = reproduce.report_table(results, lead, 4000, None, args)
    lora_row = next(line for line in table.splitlines() if line.startswith("| LoRA q,v r=8"))
    assert "| 0.900 |" in lora_row and "| 1.50 |" in lora_row and "1/100" in lora_row  # ROUGE-L, speed, size
    reproduce.plot(results, lead, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0
