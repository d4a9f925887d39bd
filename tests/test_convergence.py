"""Training a small BART on real SumPubMed text: lorafast follows PEFT LoRA's loss curve step for step.

In the style of Liger-Kernel's convergence tests: the same initial weights, the same batches, the
same optimizer, 30 AdamW steps each; per-step losses and the final adapters must agree.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import summarization_batches, tiny_bart
from lorafast import apply_lora, lora_layers

STEPS = 30


def _train(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_losses_and_adapters_match_peft(tokenizer):
    batches = summarization_batches(tokenizer, STEPS)
    base = tiny_bart(vocab_size=len(tokenizer))
    ours = apply_lora(copy.deepcopy(base), r=8, alpha=16, dropout=0.0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(copy.deepcopy(base), config)
    peft_params = dict(peft.named_parameters())
    with torch.no_grad():  # the same random A (B starts at zero in both)
        for name, layer in lora_layers(ours):
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
    initial_a = {name: layer.lora_A.detach().clone() for name, layer in lora_layers(ours)}

    ours_losses = _train(ours, batches)
    peft_losses = _train(peft, batches)

    rel = [abs(a - b) / abs(b) for a, b in zip(ours_losses, peft_losses)]
    print(f"largest relative loss difference over {STEPS} steps: {max(rel):.2e}")
    assert max(rel) <= 1e-5, list(zip(ours_losses, peft_losses))
    for name, layer in lora_layers(ours):
        # the adapters really trained: both factors moved away from their initial values
        assert layer.lora_B.abs().max() > 1e-2 and not torch.allclose(layer.lora_A, initial_a[name], atol=1e-3)
        for factor in ("A", "B"):
            want = peft_params[f"base_model.model.{name}.lora_{factor}.default.weight"]
            got = getattr(layer, f"lora_{factor}")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{name}.lora_{factor}")
