"""Expert LoRA in tiny MoE models (Qwen3-MoE: (E, out, in) stacks; GPT-OSS: (E, in, out) stacks with biases and its
own gate): apply_lora(target_parameters=...), PEFT's files both ways, and patch_peft on PEFT's ParamWrapper."""

import copy

import pytest
import torch

import lorafast
import lorafast.expert_peft
from lorafast.experts import lora_experts

VOCAB = 100
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_qwen3_moe(seed: int = 0, dtype=torch.float32):
    """Qwen3MoeForCausalLM: 2 layers, hidden 32, 4 experts of intermediate 16, top-2."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).to(dtype)


def tiny_gpt_oss(seed: int = 0, dtype=torch.float32):
    """GptOssForCausalLM: 2 layers, hidden 32, 4 experts stored (E, in, out) with biases (random here), top-2."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    return model.to(dtype)


FAMILIES = {"qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _randomize_factors(model, seed=1, scale=0.2):
    """Random LoRA factors (B no longer zero), the same for a given seed and parameter order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def _peft_model(make, adapters=("default",), seed=1):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=TARGETS)
    model = get_peft_model(make(), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    return _randomize_factors(model, seed)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the experts forward that patch_peft's wrappers run (so a fallback cannot pass)."""
    calls = []
    real = lorafast.expert_peft.lora_experts_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lorafast.expert_peft, "lora_experts_forward", spy)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_peft_logits_and_every_factor_gradient_match_unpatched(family, fused_calls):
    model = _peft_model(FAMILIES[family])
    ids = _ids()
    logits, grads = _loss_and_grads(model, ids)
    lorafast.patch_peft(model)
    assert lorafast.peft_patch.patched_layer_count(model) == 4  # 2 layers × (gate_up, down)
    patched_logits, patched_grads = _loss_and_grads(model, ids)
    assert len(fused_calls) == 2  # one per MoE layer: the outer wrapper runs both projections
    torch.testing.assert_close(patched_logits, logits, atol=1e-5, rtol=0)
    assert set(patched_grads) == set(grads) and len(grads) == 8  # A and B of 2 × 2 wrappers
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    lorafast.unpatch_peft(model)
    assert lorafast.peft_patch.patched_layer_count(model) == 0
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_five_adamw_steps_give_peft_loss_curve(family):
    unpatched = _peft_model(FAMILIES[family])
    patched = lorafast.patch_peft(copy.deepcopy(unpatched))
    curves = []
    for model in (unpatched, patched):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(5):
            ids = _ids(step)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][0] != curves[0][-1]  # it trains
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), atol=1e-4, rtol=0)


def test_several_adapters_switched_and_both_active_match_peft(fused_calls):
    model = _peft_model(tiny_qwen3_moe, adapters=("a", "b"))
    ids = _ids()
    reference = {}
    for active in ("a", "b", ["a", "b"]):
        model.base_model.set_adapter(active)
        reference[str(active)] = model(input_ids=ids).logits.detach()
    lorafast.patch_peft(model)
    for active in ("a", "b", ["a", "b"]):
        model.base_model.set_adapter(active)
        torch.testing.assert_close(model(input_ids=ids).logits, reference[str(active)], atol=1e-5, rtol=0)
    assert len(fused_calls) == 6
    assert not torch.allclose(reference["a"], reference["b"])
    with model.disable_adapter():  # PEFT's forward: the base model
        base = model(input_ids=ids).logits
    torch.testing.assert_close(base, tiny_qwen3_moe()(input_ids=ids).logits)
    # PEFT's own refusal (last: PEFT leaves its adapter_names hooks behind when a layer raises)
    with pytest.raises(ValueError, match="does not support mixed adapter batches"):
        model.eval()(input_ids=ids, adapter_names=["a", "b"])


@pytest.mark.parametrize("family", FAMILIES)
def test_lorafast_adapter_loads_in_peft_to_the_same_logits_and_back(family, tmp_path):
    from peft import PeftModel

    make = FAMILIES[family]
    modules = ["q_proj"] if family == "qwen3_moe" else []  # linear layers beside the experts, in one file
    model = _randomize_factors(lorafast.apply_lora(make(), modules, target_parameters=TARGETS, r=8, alpha=16))
    ids = _ids()
    logits = model(input_ids=ids).logits.detach()
    lorafast.save_adapter(model, tmp_path / "lorafast")
    peft_model = PeftModel.from_pretrained(make(), tmp_path / "lorafast")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    assert torch.norm(logits - make()(input_ids=ids).logits) > 1e-2  # the adapter changes the outputs
    peft_model.save_pretrained(tmp_path / "peft")
    back = lorafast.load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(back(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    _randomize_factors(back, seed=9)
    lorafast.load_adapter(back, tmp_path / "lorafast")  # into a model that has these adapters: the factors replaced
    torch.testing.assert_close(back(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    for (_, ours), (_, loaded) in zip(lora_experts(model), lora_experts(back)):
        for name, adapter in ours.lora_adapters.items():
            torch.testing.assert_close(loaded.lora_adapters[name].lora_A, adapter.lora_A, atol=0, rtol=0)
            torch.testing.assert_close(loaded.lora_adapters[name].lora_B, adapter.lora_B, atol=0, rtol=0)


def test_zero_adapter_is_the_base_model_and_merge_and_remove_restore_it():
    base = tiny_qwen3_moe()
    ids = _ids()
    expected = base(input_ids=ids).logits.detach()
    experts_class = type(base.model.layers[0].mlp.experts)
    model = lorafast.apply_lora(base, target_parameters=TARGETS, r=4)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=0)  # B starts at zero
    assert lorafast.parameter_counts(model).trainable == 2 * (4 * 4 * 32 + 4 * 32 * 4 + 4 * 4 * 16 + 4 * 32 * 4)
    _randomize_factors(model)
    adapted = model(input_ids=ids).logits.detach()
    merged = lorafast.merge_lora(copy.deepcopy(model))
    assert type(merged.model.layers[0].mlp.experts) is experts_class
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    removed = lorafast.remove_lora(model)
    assert type(removed.model.layers[0].mlp.experts) is experts_class and not list(lora_experts(removed))
    torch.testing.assert_close(removed(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_gradients_of_the_experts_equal_float64_central_differences(family):
    """The whole experts forward (sort, gate, down, routing weights) in float64, dropout 0.1: gradients of the
    hidden states, routing weights and every factor against central differences (the full model would not do:
    its norms and router run in float32)."""
    model = lorafast.apply_lora(FAMILIES[family](dtype=torch.float64), target_parameters=TARGETS, r=2, dropout=0.1)
    _randomize_factors(model, scale=0.5)
    experts = next(lora_experts(model))[1].train()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 32, generator=g, dtype=torch.float64, requires_grad=True)
    top_k_index = torch.tensor([[0, 1], [1, 3], [3, 0], [1, 0], [0, 3], [3, 1]])  # expert 2 unused
    top_k_weights = torch.rand(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in experts.named_parameters() if "lora_" in n]
    factors = [experts.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def run(hidden, top_k_weights, *factors):
        torch.manual_seed(7)  # the same dropout masks on every evaluation
        return torch.func.functional_call(experts, dict(zip(names, factors)), (hidden, top_k_index, top_k_weights))

    eval_out = torch.func.functional_call(
        experts.eval(), dict(zip(names, factors)), (hidden, top_k_index, top_k_weights)
    )
    experts.train()
    assert not torch.allclose(run(hidden, top_k_weights, *factors), eval_out)  # dropout acts in training
    assert torch.autograd.gradcheck(run, (hidden, top_k_weights, *factors), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_parameters": ["experts.nothing"]}, r"match no parameter of Qwen3MoeForCausalLM"),
        ({"target_parameters": ["self_attn.q_proj.weight"]}, "is not an expert projection"),
        ({"target_parameters": "experts.down_proj"}, "non-empty list"),
        ({"target_parameters": TARGETS, "use_dora": True}, "use_dora is not supported on expert parameters"),
        ({"target_parameters": TARGETS, "dropout": 1.0}, "dropout"),
    ],
)
def test_apply_lora_refuses_bad_target_parameters_before_changing_the_model(kwargs, message):
    model = tiny_qwen3_moe()
    with pytest.raises(ValueError, match=message):
        lorafast.apply_lora(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters()) and not list(lora_experts(model))


def test_apply_lora_twice_and_named_adapter_loads_are_refused(tmp_path):
    model = lorafast.apply_lora(tiny_qwen3_moe(), target_parameters=TARGETS)
    with pytest.raises(ValueError, match="already has LoRA"):
        lorafast.apply_lora(model, target_parameters=TARGETS)
    lorafast.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="not as a named adapter"):
        lorafast.load_adapter(tiny_qwen3_moe(), tmp_path, adapter_name="x")
    with pytest.raises(ValueError, match="match no parameter"):
        lorafast.load_adapter(tiny_gpt_oss().model, tmp_path)  # other module names


@pytest.mark.parametrize("bad", [-1, 4])  # 4 experts: ids 0..3
def test_expert_ids_outside_the_stack_are_refused_by_name(bad):
    model = lorafast.apply_lora(tiny_qwen3_moe(), target_parameters=TARGETS, r=4)
    experts = model.model.layers[0].mlp.experts
    index = torch.tensor([[0, 1], [2, bad], [3, 3]])
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 4\)"):
        experts(torch.randn(3, 32), index, torch.full((3, 2), 0.5))
    experts(torch.randn(3, 32), index.clamp(0, 3), torch.full((3, 2), 0.5))  # in range: runs
