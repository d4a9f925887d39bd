"""train/: the SumPubMed loader and the fine-tuning script, end to end on a random tiny BART."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

from conftest import SUMPUBMED, run_torchrun

TRAIN = Path(__file__).resolve().parents[1] / "train"
sys.path.insert(0, str(TRAIN))

import finetune  # noqa: E402
import model_setup  # noqa: E402
import run_folder  # noqa: E402
import sumpubmed  # noqa: E402

# A small, fast run: a few documents, short sequences, greedy-ish decoding.
SMOKE = [
    "--data", str(SUMPUBMED), "--model", "random:tiny", "--max-source-length", "128", "--max-target-length", "48",
    "--eval-docs", "4", "--num-beams", "2", "--gen-max-tokens", "24", "--eval-batch-size", "4",
]  # fmt: skip


def _run(tmp_path, *extra, on_step=None):
    args = finetune.parse_args([*SMOKE, "--output-dir", str(tmp_path), *extra])
    return finetune.train(args, on_step=on_step), args


def _step_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run_folder.read_log(Path(output_dir)) if "loss" in r}


# --- data ----------------------------------------------------------------------------------------


def test_loads_the_shared_release():
    documents, report = sumpubmed.load_release(SUMPUBMED)
    # one document of the sample has an empty shorter abstract: skipped and counted
    assert (SUMPUBMED / "shorter_abstract" / "abst_12187.txt").read_text().strip() == ""
    assert report.loaded == len(documents) == 1999 and dict(report.skipped) == {"empty": 1}
    assert "12187" not in {d.doc_id for d in documents}
    assert [d.doc_id for d in documents] == sorted((d.doc_id for d in documents), key=int)
    doc = documents[0]
    raw = (SUMPUBMED / "text" / f"text_{doc.doc_id}.txt").read_text()
    assert "<cit>" in raw or "<dig>" in raw or "BACKGROUND" in raw
    for text in (doc.text, doc.summary):
        assert "<cit>" not in text and "<dig>" not in text and "BACKGROUND" not in text and "  " not in text
    short, _ = sumpubmed.load_release(SUMPUBMED, target="shorter_abstract")
    assert short[0].text == doc.text and short[0].summary != doc.summary


def test_cleaning():
    raw = "BACKGROUND\nthe cell  <cit> . grew by  <dig> % in <dig> days  <cit> ,  then stopped.\n\nRESULTS AND\nok"
    cleaned = "the cell. grew by # % in # days, then stopped."
    assert sumpubmed.clean(raw) == cleaned + " ok"
    assert sumpubmed.clean(raw, keep_lines=True).splitlines() == [cleaned, "ok"]


def test_malformed_release_skips_and_counts(tmp_path, capsys):
    ids = [p.stem.removeprefix("text_") for p in sorted((SUMPUBMED / "text").glob("text_*.txt"))[:12]]
    for sub, pattern in [("text", "text_{}.txt"), ("abstract", "abstract_{}.txt"), ("shorter_abstract", "abst_{}.txt")]:
        (tmp_path / sub).mkdir()
        for i in ids:
            shutil.copy(SUMPUBMED / sub / pattern.format(i), tmp_path / sub / pattern.format(i))
    (tmp_path / "abstract" / f"abstract_{ids[0]}.txt").unlink()  # missing file
    (tmp_path / "shorter_abstract" / f"abst_{ids[1]}.txt").unlink()  # missing file
    (tmp_path / "text" / f"text_{ids[2]}.txt").write_text("  \n")  # empty
    (tmp_path / "abstract" / f"abstract_{ids[3]}.txt").write_text("BACKGROUND\n <cit> \n")  # empty once cleaned
    (tmp_path / "text" / f"text_{ids[4]}.txt").write_bytes(b"caf\xe9 \xff\xfe")  # not UTF-8
    documents, report = sumpubmed.load_release(tmp_path)
    assert report.loaded == len(documents) == 7
    assert dict(report.skipped) == {"missing files": 2, "empty": 2, "not UTF-8": 1}
    assert str(report) == "loaded 7 documents; skipped 5 (2 empty, 2 missing files, 1 not UTF-8)"


def test_bad_data_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sumpubmed.load_documents(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no text/ folder"):
        sumpubmed.load_release(tmp_path)
    (tmp_path / "text").mkdir()
    with pytest.raises(ValueError, match="no SumPubMed documents could be loaded"):
        sumpubmed.load_documents(tmp_path)
    with pytest.raises(ValueError, match="target must be one of"):
        sumpubmed.load_release(SUMPUBMED, target="title")


def test_local_parquet_and_json_through_datasets(tmp_path):
    import datasets

    documents, _ = sumpubmed.load_release(SUMPUBMED)
    rows = {"id": [d.doc_id for d in documents[:6]], "text": ["<cit> " + d.text for d in documents[:6]]}
    rows["abstract"] = [d.summary for d in documents[:6]]
    rows["text"][5] = ""  # an empty row is skipped and counted
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "part.parquet")
    loaded, report = sumpubmed.load_documents(tmp_path / "part.parquet")
    assert [d.doc_id for d in loaded] == rows["id"][:5] and dict(report.skipped) == {"empty": 1}
    assert loaded[0].text == documents[0].text and loaded[0].summary == documents[0].summary
    (tmp_path / "json").mkdir()
    datasets.Dataset.from_dict({"text": rows["text"][:3], "summary": ["a b.", "c d.", "e f."]}).to_json(
        tmp_path / "json" / "data.jsonl"
    )
    loaded, _ = sumpubmed.load_documents(tmp_path / "json")
    assert [d.summary for d in loaded] == ["a b.", "c d.", "e f."]
    with pytest.raises(ValueError, match="has no column 'body'"):
        sumpubmed.load_table(str(tmp_path / "part.parquet"), summary_column="abstract", text_column="body")


def test_split_is_deterministic_and_proportioned():
    documents, _ = sumpubmed.load_release(SUMPUBMED)
    ids = [d.doc_id for d in documents]
    here = [sumpubmed.split_of(i) for i in ids]
    script = f"import sys; sys.path.insert(0, {str(TRAIN)!r}); import sumpubmed; import json; print(json.dumps(" \
             f"[sumpubmed.split_of(i) for i in {ids!r}]))"  # fmt: skip
    elsewhere = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout)
    assert here == elsewhere  # another process (another hash seed) splits alike
    share = {s: here.count(s) / len(here) for s in sumpubmed.SPLITS}
    assert 0.87 < share["train"] < 0.93 and 0.03 < share["validation"] < 0.07 and 0.03 < share["test"] < 0.07


def test_length_bucketed_batches():
    lengths = [(i * 37) % 101 for i in range(400)]
    batches = sumpubmed.bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert batches == sumpubmed.bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert batches != sumpubmed.bucketed_batches(lengths, 8, seed=1, epoch=1)
    assert all(len(b) == 8 for b in batches) and len({i for b in batches for i in b}) == 400
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # similar lengths share a batch (random batches would spread ~90)


# --- training ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_smoke_run(tmp_path):
    """A repeated small batch: the loss goes down, every output is written and loads where it should."""
    metrics, args = _run(
        tmp_path, "--max-docs", "4", "--batch-size", "4", "--epochs", "40", "--lr", "1e-2", "--dropout", "0",
        "--target-modules", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "--merge", "--save-every", "10",
    )  # fmt: skip
    losses = _step_losses(tmp_path)
    assert len(losses) == 40 and losses[40] < losses[1] - 0.5  # nats
    assert metrics["first_loss"] == losses[1] and metrics["last_loss"] == losses[40]
    for name in ("metrics.json", "log.jsonl", "loss_curve.png", "predictions.jsonl", "adapter", "merged", "tokenizer"):
        assert (tmp_path / name).exists(), name
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # newest 2
    assert metrics["trainable_parameters"] > 0 and metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0

    # ROUGE in metrics.json is rouge-score's on the written predictions
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(r["reference"], r["prediction"]) for r in rows]
    for kind, value in metrics["rouge"].items():
        assert value == pytest.approx(100 * sum(s[kind].fmeasure for s in scores) / len(scores), abs=1e-9)

    # the adapter loads in PEFT, and the merged model in plain transformers, with the same outputs
    from peft import PeftModel
    from transformers import BartForConditionalGeneration

    import lorafast

    def base():
        torch.manual_seed(args.seed)
        return model_setup.load_model("random:tiny", tmp_path / "tokenizer")[0].eval()

    ours = lorafast.load_adapter(base(), tmp_path / "adapter").eval()
    peft_model = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    merged = BartForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    batch = {"input_ids": torch.tensor([[0, 10, 20, 30, 2]]), "decoder_input_ids": torch.tensor([[2, 0, 40]])}
    with torch.no_grad():
        want = ours(**batch).logits
        torch.testing.assert_close(peft_model(**batch).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base()(**batch).logits, want, atol=1e-3)  # the adapter did train


@pytest.mark.slow  # tests/test_faults.py resumes (from damaged checkpoints too) in the default run
@pytest.mark.parametrize("method", ["lorafast", "peft", "full"])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, method):
    common = ["--method", method, "--max-docs", "24", "--batch-size", "4", "--max-steps", "6", "--save-every", "3",
              "--eval-docs", "0"]  # fmt: skip
    _run(tmp_path / "whole", *common)

    class SimulatedCrashError(Exception):
        pass

    def interrupt(step, loss):
        if step == 4:  # after checkpoint-3 and one more step that the resumed run must redo
            raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        _run(tmp_path / "parts", *common, on_step=interrupt)
    _run(tmp_path / "parts", *common, "--resume")
    whole, parts = _step_losses(tmp_path / "whole"), _step_losses(tmp_path / "parts")
    assert list(parts) == [1, 2, 3, 4, 5, 6]
    assert parts == pytest.approx(whole, rel=1e-6, abs=0)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(run_folder.RunError, match="no checkpoint"):
        _run(tmp_path, "--resume", "--max-steps", "1")


@pytest.mark.slow
def test_model_from_a_local_folder(tmp_path):
    """A model saved with save_pretrained goes through the real from_pretrained path."""
    torch.manual_seed(0)
    tokenizer_dir = tmp_path / "saved"
    documents, _ = sumpubmed.load_release(SUMPUBMED)
    model_setup.ensure_tokenizer("random:tiny", documents[:50], tokenizer_dir)
    model = model_setup.load_model("random:tiny", tokenizer_dir)[0]
    model.save_pretrained(tokenizer_dir)
    metrics, _ = _run(tmp_path / "run", "--model", str(tokenizer_dir), "--max-docs", "8", "--batch-size", "4",
                      "--max-steps", "2")  # fmt: skip
    assert metrics["random_weights"] is False and metrics["model"] == str(tokenizer_dir) and metrics["steps"] == 2


def test_unreachable_hub_model_names_the_alternatives(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as without network
    alternatives = r"save_pretrained, or one of the random presets \['random:base', 'random:tiny'\]"
    with pytest.raises(OSError, match=alternatives):
        model_setup.load_model("facebook/bart-base", tmp_path)


@pytest.mark.slow  # tests/test_ddp.py covers DDP over two processes
def test_torchrun_two_processes_match_one(tmp_path):
    """DDP over 2 processes (gloo), data sharded by rank: the loss curve of 1 process, same global batch."""
    common = ["--max-docs", "32", "--max-steps", "4", "--eval-docs", "0", "--model-dropout", "0", "--dropout", "0"]
    _run(tmp_path / "one", *common, "--batch-size", "4")
    run_torchrun(
        [str(TRAIN / "finetune.py"), *SMOKE, *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")]
    )
    one, two = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert list(two) == [1, 2, 3, 4]
    assert two == pytest.approx(one, rel=1e-5)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
