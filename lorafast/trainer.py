"""Adapter-only checkpoints for a ``transformers.Trainer`` training an ``apply_lora`` model.

Only the LoRA factors change, so :func:`adapter_checkpoints` saves and resumes the adapter alone in PEFT's format
instead of the whole model; the Trainer keeps optimizer, scheduler, RNG and state as usual. (A ``PeftModel``,
patched or not, needs none of this: the Trainer saves its adapter.)
"""

from __future__ import annotations

import os

from .adapter import load_adapter, save_adapter
from .model import lora_layers


def adapter_checkpoints(trainer, task_type: str | None = None):
    """Make ``trainer`` (``Trainer``, ``Seq2SeqTrainer``, TRL's) save and load only the LoRA adapter; returns it.

    Checkpoints and ``save_model()`` hold ``adapter_config.json`` and ``adapter_model.safetensors`` (for PEFT and
    ``load_adapter``) beside the Trainer's files; ``resume_from_checkpoint`` and ``load_best_model_at_end`` load
    the adapter back. ``task_type`` is recorded for PEFT's auto classes. ValueError without ``apply_lora`` layers.
    """
    if next(lora_layers(trainer.model), None) is None:
        raise ValueError(
            f"the trainer's {type(trainer.model).__name__} has no LoRA layers from lorafast.apply_lora; "
            "adapter_checkpoints saves only those (a peft.PeftModel saves its adapter by itself)"
        )

    def unwrap(model):
        return trainer.accelerator.unwrap_model(model if model is not None else trainer.model)

    def save(output_dir: str | None = None, state_dict=None) -> None:
        if not trainer.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        save_adapter(unwrap(trainer.model), output_dir, task_type=task_type)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)

    def load(resume_from_checkpoint: str, model=None) -> None:
        load_adapter(unwrap(model), resume_from_checkpoint)

    def load_best() -> None:
        best = trainer.state.best_model_checkpoint
        if best is not None and os.path.isdir(best):
            load_adapter(unwrap(trainer.model), best)

    trainer._save, trainer._load_from_checkpoint, trainer._load_best_model = save, load, load_best
    return trainer
