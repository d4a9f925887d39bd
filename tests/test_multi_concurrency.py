"""Adapter ids belong to the call: concurrent requests on one model, exceptions, removed adapters, empty ids."""

import asyncio
import random
import threading

import pytest
import torch

from conftest import tiny_bart
from lorafast import MultiLoRALinear, adapter_ids, add_adapter, multi_lora_layers, remove_adapter, set_adapter

NAMES = ("medical", "legal", "news")


def three_adapter_bart():
    """tiny BART, three adapters on q,v with random B (each changes the output), no active adapter."""
    model = tiny_bart().eval()
    g = torch.Generator().manual_seed(3)
    for name, r in zip(NAMES, (4, 8, 2)):
        add_adapter(model, name, r=r, alpha=2 * r + 1)
    with torch.no_grad():
        for _, layer in multi_lora_layers(model):
            for name in NAMES:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3)
    set_adapter(model, None)
    return model


def _requests(count, seed):
    """``count`` requests: (input_ids (b, 12), decoder_input_ids (b, 6), one adapter id per sequence)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        b = rng.choice((1, 2))
        ids = [rng.choice((*NAMES, None)) for _ in range(b)]
        tokens = torch.randint(5, 1000, (b, 18), generator=g)
        requests.append((tokens[:, :12], tokens[:, 12:], ids))
    return requests


def _run(model, request):
    input_ids, decoder_input_ids, ids = request
    with adapter_ids(model, ids), torch.no_grad():
        return model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


def _plain(model, request):
    with torch.no_grad():
        return model(input_ids=request[0], decoder_input_ids=request[1]).logits


def test_threads_serving_different_adapters_on_one_model_each_get_their_own(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")  # the interpreter is not thread-safe; the ids logic is shared
    model = three_adapter_bart()
    threads, per_thread = 4, 5
    work = [_requests(per_thread, seed=t) for t in range(threads)]
    alone = [[_run(model, request) for request in requests] for requests in work]
    base_before = _plain(model, work[0][0])
    results = [[None] * per_thread for _ in range(threads)]
    errors = []
    start = threading.Barrier(threads)

    def serve(t):
        try:
            start.wait()
            for i, request in enumerate(work[t]):
                results[t][i] = _run(model, request)
        except Exception as exc:  # reported below, with the thread's number
            errors.append((t, exc))

    pool = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    mismatched = [
        (t, i) for t in range(threads) for i in range(per_thread) if not torch.equal(results[t][i], alone[t][i])
    ]
    assert not mismatched, f"{len(mismatched)} of {threads * per_thread} outputs differ from the request run alone"
    # nothing left behind: no ids set, and the model is the base model as before
    torch.testing.assert_close(_plain(model, work[0][0]), base_before, atol=0, rtol=0)
    torch.testing.assert_close(base_before, _plain(tiny_bart().eval(), work[0][0]), atol=0, rtol=0)
    assert all(layer.row_adapters is None for _, layer in multi_lora_layers(model))


def test_asyncio_tasks_interleaving_inside_their_blocks_keep_their_own_ids(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    model = three_adapter_bart()
    requests = _requests(6, seed=11)
    alone = [_run(model, request) for request in requests]

    async def serve(request):
        input_ids, decoder_input_ids, ids = request
        with adapter_ids(model, ids):
            await asyncio.sleep(0)  # every other task enters its block before this one runs
            with torch.no_grad():
                return model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits

    async def serve_all():
        return await asyncio.gather(*(serve(request) for request in requests))

    for got, want in zip(asyncio.run(serve_all()), alone):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_an_exception_inside_the_block_leaves_no_ids_behind(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    model = three_adapter_bart()
    request = _requests(1, seed=5)[0]
    base = _plain(model, request)
    with pytest.raises(RuntimeError, match="request failed"):
        with adapter_ids(model, ["legal"] * request[0].shape[0]):
            assert not torch.equal(_plain(model, request), base)  # the adapter runs inside
            raise RuntimeError("request failed")
    torch.testing.assert_close(_plain(model, request), base, atol=0, rtol=0)


def test_nested_blocks_use_the_innermost_ids_and_restore_the_outer_ones(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    model = three_adapter_bart()
    request = _requests(1, seed=6)[0]
    b = request[0].shape[0]
    legal, news = _run(model, (*request[:2], ["legal"] * b)), _run(model, (*request[:2], ["news"] * b))
    with adapter_ids(model, ["legal"] * b):
        with adapter_ids(model, ["news"] * b):
            torch.testing.assert_close(_plain(model, request), news, atol=0, rtol=0)
        torch.testing.assert_close(_plain(model, request), legal, atol=0, rtol=0)


def _two_layer_model():
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 8))
    for name in ("a", "b", "c"):
        add_adapter(model, name, r=2, target_modules=["0", "1"])
    return model


def test_removing_an_adapter_the_ids_use_is_a_clear_error(backend):
    model = _two_layer_model()
    x = torch.randn(3, 16)
    with adapter_ids(model, ["a", "c", None]):
        model(x)
        remove_adapter(model, "b")
        with pytest.raises(ValueError, match=r"adapter\(s\) \['b'\] were removed after the adapter ids were set"):
            model(x)
    assert isinstance(model[0], MultiLoRALinear)
    with adapter_ids(model, ["a", "c", None]):  # ids set again refer to the adapters now there
        model(x)


def test_empty_ids_are_a_clear_error():
    model = _two_layer_model()
    with pytest.raises(ValueError, match="adapter ids are empty"):
        with adapter_ids(model, []):
            pass
    with pytest.raises(ValueError, match="adapter ids are empty"):
        model[0].set_row_adapters(torch.tensor([], dtype=torch.int64))


def test_a_compiled_model_follows_each_blocks_ids(monkeypatch):
    """torch.compile must not bake one block's ids into its graph."""
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    torch.manual_seed(0)
    model = _two_layer_model()
    with torch.no_grad():
        for _, layer in multi_lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_()
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and guards are what could bake the ids in
    x = torch.randn(3, 4, 16)
    for ids in (["a", "b", None], ["c", "a", "a"], ["c", "a", "a"]):
        with adapter_ids(model, ids):
            torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(compiled(x), model(x))  # no ids: the base model
