"""transformers Trainer with lorafast: adapter-only checkpoints that resume exactly, via patch_peft or apply_lora."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import MODELS, TASK_TYPES, lm_batch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

import lorafast
from lorafast.peft_patch import patched_layer_count

STEPS, SAVE_EVERY = 4, 2


class _Examples(torch.utils.data.Dataset):
    """8 fixed-length examples of ``kind``'s batch format."""

    def __init__(self, kind):
        batch = lm_batch(kind, batch=8, length=12, seed=5)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(trainer_cls, args_cls, model, kind, output_dir, resume=None, prepare=lambda t: t):
    args = args_cls(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="linear", use_cpu=True, report_to=[], disable_tqdm=True,
        logging_steps=1, seed=3, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = prepare(trainer_cls(model=model, args=args, train_dataset=_Examples(kind)))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _lora_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _check_checkpoints(output_dir, full_bytes):
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        folder = output_dir / f"checkpoint-{step}"
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}  # no copy of the whole model
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert size < 0.05 * full_bytes, (size, full_bytes)


def _patched_peft_llama():
    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type=TASK_TYPES["llama"])
    return lorafast.patch_peft(get_peft_model(MODELS["llama"](), config))


def test_patch_peft_trainer_saves_small_adapter_checkpoints_and_resumes_exactly(tmp_path):
    model = _patched_peft_llama()
    full_bytes = _model_bytes(model)
    start = _lora_tensors(model)
    _train(Trainer, TrainingArguments, model, "llama", tmp_path / "run")
    assert patched_layer_count(model) == 4
    _check_checkpoints(tmp_path / "run", full_bytes)
    final = _lora_tensors(model)
    assert any(not torch.equal(final[k], start[k]) for k in final)  # it trained

    resumed = _patched_peft_llama()
    _train(Trainer, TrainingArguments, resumed, "llama", tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-2")
    got = _lora_tensors(resumed)
    for key in final:
        torch.testing.assert_close(got[key], final[key], atol=1e-6, rtol=1e-5)
    loaded = PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "run" / "checkpoint-4")
    saved = {k.replace(".default", ""): v for k, v in _lora_tensors(loaded).items()}
    assert saved.keys() == {k.replace(".default", "") for k in final}


def _lorafast_bart(r=4):
    torch.manual_seed(1)
    return lorafast.apply_lora(MODELS["bart"](), r=r, alpha=8)


def test_apply_lora_seq2seq_trainer_adapter_checkpoints_resume_exactly_and_load_in_peft(tmp_path):
    prepare = lambda trainer: lorafast.adapter_checkpoints(trainer, task_type="SEQ_2_SEQ_LM")
    model = _lorafast_bart()
    full_bytes = _model_bytes(model)
    _train(Seq2SeqTrainer, Seq2SeqTrainingArguments, model, "bart", tmp_path / "run", prepare=prepare)
    _check_checkpoints(tmp_path / "run", full_bytes)
    final = _lora_tensors(model)

    resumed = _lorafast_bart()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    _train(
        Seq2SeqTrainer, Seq2SeqTrainingArguments, resumed, "bart", tmp_path / "b", resume=checkpoint, prepare=prepare
    )
    got = _lora_tensors(resumed)
    for key in final:
        torch.testing.assert_close(got[key], final[key], atol=1e-6, rtol=1e-5)

    peft_model = PeftModel.from_pretrained(MODELS["bart"](), tmp_path / "run" / "checkpoint-4")
    saved = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    assert len(saved) == len(final) == 24
    batch = lm_batch("bart", seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model.eval()(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5
        )


def test_adapter_checkpoints_refuses_a_model_without_lora(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=MODELS["bart"](), args=args)
    with pytest.raises(ValueError, match=r"has no LoRA layers from lorafast\.apply_lora"):
        lorafast.adapter_checkpoints(trainer)
