"""Local stand-ins for the tiny random hub models PEFT's tests load
(``peft-internal-testing/tiny-random-OPTForCausalLM`` and the like), for runs where the hub is unreachable.

``install()`` wraps ``from_pretrained`` of transformers' models and auto classes: an id naming a known tiny test model
builds that architecture from a small config with fixed seed 0, so every load of one id gives the same weights (as a
checkpoint would). Tokenizers and other hub files are not provided: cases that need them still skip as offline.
"""

from __future__ import annotations

import functools
import os
import re

import torch

# id suffix -> transformers class name, for ids whose suffix is not the class name itself
_ALIASES = {
    "tiny-random-gpt2": "GPT2LMHeadModel",
    "tiny-dummy-qwen2": "Qwen2ForCausalLM",
    "tiny-random-T5ForConditionalGeneration-calibrated": "T5ForConditionalGeneration",
}
_ID = re.compile(r"^(?:peft|hf|trl)-internal-testing/(?P<name>tiny-(?:random|dummy)-[A-Za-z0-9_-]+)$")
# small sizes, under each config family's own names (unknown keys are ignored by the config)
_SIZES = {
    "vocab_size": 128,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 64,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "rotary_dim": 4,
    "ffn_dim": 32,
    "word_embed_proj_dim": 16,
    "d_model": 16,
    "d_ff": 32,
    "d_kv": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
}


def model_class_name(model_id) -> str | None:
    """The transformers class a tiny hub test model id stands for, or None for any other id or a local path."""
    if not isinstance(model_id, str) or os.path.isdir(model_id):
        return None
    match = _ID.match(model_id)
    if match is None:
        return None
    name = match["name"]
    return _ALIASES.get(name, name.removeprefix("tiny-random-").removeprefix("tiny-dummy-"))


def build(model_id: str, cls=None, **kwargs):
    """A small random model of ``model_id``'s architecture (``cls`` if given), seed 0, in ``dtype`` if asked."""
    import transformers

    arch = getattr(transformers, model_class_name(model_id))
    cls = arch if getattr(cls, "config_class", None) is None else cls
    config_class = arch.config_class
    config = config_class(**{k: v for k, v in _SIZES.items() if _accepts(config_class, k)})
    config.name_or_path = model_id  # as from_pretrained records it (adapter configs and model cards read it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = (
            cls(config) if hasattr(cls, "config_class") and cls.config_class is not None else cls.from_config(config)
        )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model.eval()


def _accepts(config_class, key: str) -> bool:
    import inspect

    params = inspect.signature(config_class.__init__).parameters
    return key in params or key in getattr(config_class, "attribute_map", {})


def install() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` and the auto classes' ``from_pretrained`` (see the module docstring)."""
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    # each auto class created so far holds its own copy of _BaseAutoModelClass.from_pretrained
    auto_classes = [_BaseAutoModelClass, *_subclasses(_BaseAutoModelClass)]
    for owner in [PreTrainedModel, *(c for c in auto_classes if "from_pretrained" in vars(c))]:
        original = owner.from_pretrained.__func__

        def from_pretrained(cls, model_id=None, *args, _original=original, **kwargs):
            if model_class_name(model_id) is None:
                return _original(cls, model_id, *args, **kwargs)
            return build(model_id, None if issubclass(cls, _BaseAutoModelClass) else cls, **kwargs)

        owner.from_pretrained = classmethod(functools.wraps(original)(from_pretrained))


def _subclasses(cls) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]
