"""Small random decoder LLMs (Llama-style with grouped-query attention, GPT-2) and BART for model-level tests."""

import torch

from conftest import tiny_bart

VOCAB = 120


def tiny_llama(seed: int = 0):
    """LlamaForCausalLM: 2 layers, hidden 32, 4 query heads over 2 key/value heads (GQA), all seven projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel: 2 layers, hidden 32, Conv1D projections (c_attn, c_proj, c_fc), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def tiny_seq2seq(seed: int = 0):
    """A small BART (see conftest.tiny_bart) with this module's vocabulary."""
    return tiny_bart(vocab_size=VOCAB, seed=seed)


MODELS = {"llama": tiny_llama, "bart": tiny_seq2seq, "gpt2": tiny_gpt2}
# PEFT's and lorafast's task type and the targets (GPT-2's projections are Conv1D: fan_in_fan_out).
TASK_TYPES = {"llama": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM", "gpt2": "CAUSAL_LM"}


def lm_batch(kind: str, batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with labels (and BART's decoder side) for ``kind``'s model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # some padding, on the left as decoders generate
    if kind == "bart":
        labels = torch.randint(3, VOCAB, (batch, length), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peft_saved_adapters(tmp_path, make_model, configs: dict, seed: int) -> dict:
    """``{name: directory}``: for each ``name: LoraConfig``, a PEFT model on ``make_model()`` whose LoRA factors are
    random (``N(0, 0.2²)``, generator seeded ``seed + i``, so B is not zero), saved by PEFT itself."""
    from peft import get_peft_model

    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        peft_model = get_peft_model(make_model(), config)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        peft_model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs
