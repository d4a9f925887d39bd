"""A pytest plugin that runs PEFT's own test suite with every PEFT model passed through ``lorafast.patch_peft``.

Loaded with ``-p lorafast_peft_plugin`` (this folder on ``PYTHONPATH``) before PEFT's test modules are imported,
it wraps ``peft.get_peft_model``, ``peft.inject_adapter_in_model``, ``PeftModel.from_pretrained`` and
``PeftModel.add_adapter`` / ``load_adapter`` (layers added later are patched too), so each model a test builds or
loads runs lorafast's fused LoRA linear where lorafast supports the layer. ``LORAFAST_PEFT_PATCH=0`` loads the
plugin without patching (the baseline run: same collection, same skips). Cases that need the Hugging Face hub are
skipped in both runs, named by the error they raise offline; ``--tiny-hub-models`` builds the tiny random hub
models locally instead (``tiny_hub_models.py``). The terminal summary counts the models patched and
the fused calls made. ``run_peft_tests.sh`` runs both and compares them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import types

import pytest

PATCH = os.environ.get("LORAFAST_PEFT_PATCH", "1") != "0"
_counts = {"models": 0, "patched_layers": 0, "fused_calls": 0}
# Errors raised offline by a case that downloads a model or file from the hub: such a case cannot run here.
_HUB_ERRORS = (
    "offline mode",
    "huggingface.co",
    "LocalEntryNotFoundError",
    "We couldn't connect",
    "Cannot find the requested files in the disk cache",
    "is not a local folder and is not a valid model identifier",
    "OfflineModeIsEnabled",
    "Can't load the configuration of",
    "Can't load tokenizer",
)


def _stub_missing_diffusers() -> None:
    """PEFT's testing_common imports diffusers for its Stable Diffusion cases only; without it they cannot run,
    and the stub lets the other cases be collected."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # a placeholder: the Stable Diffusion cases fail in both runs
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                raise ImportError("diffusers is not installed")

        stub.StableDiffusionPipeline = StableDiffusionPipeline
        stub.__version__ = "0"  # read by test_tuners_utils at import
        sys.modules["diffusers"] = stub


def _patch(model):
    import lorafast
    from lorafast.peft_patch import patched_layer_count

    lorafast.patch_peft(model)
    _counts["models"] += 1
    _counts["patched_layers"] += patched_layer_count(model)
    return model


def _wrap_function(module, name: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return _patch(original(*args, **kwargs))

    setattr(module, name, wrapped)


def _install() -> None:
    import peft
    import peft.mapping
    import peft.mapping_func
    from peft import PeftModel

    import lorafast.peft_patch

    for module in (peft, peft.mapping_func):
        _wrap_function(module, "get_peft_model")
    for module in (peft, peft.mapping):  # the low-level API: LoRA layers injected into a plain model
        _wrap_function(module, "inject_adapter_in_model")

    original_from_pretrained = PeftModel.from_pretrained.__func__

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        return _patch(original_from_pretrained(cls, *args, **kwargs))

    PeftModel.from_pretrained = classmethod(from_pretrained)

    for name in ("add_adapter", "load_adapter"):
        original = getattr(PeftModel, name)

        def method(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            _patch(self)
            return result

        setattr(PeftModel, name, functools.wraps(original)(method))

    for name in ("base_lora_linear", "multi_lora_linear"):  # one adapter (plain or DoRA, any base), mixed batch
        real = getattr(lorafast.peft_patch, name)

        def counted(*args, _real=real, **kwargs):
            _counts["fused_calls"] += 1
            return _real(*args, **kwargs)

        setattr(lorafast.peft_patch, name, counted)


def pytest_addoption(parser):
    parser.addoption(
        "--lora-only",
        action="store_true",
        help="keep only LoRA cases: ids naming LoraConfig (not another tuner's config) or a LoRA test without one",
    )
    parser.addoption(
        "--tiny-hub-models",
        action="store_true",
        help="build the tiny random hub test models locally (tiny_hub_models.py) instead of downloading them",
    )


_CONFIG_IN_ID = re.compile(r"([A-Za-z]+)Config(?![A-Za-z])")


def _is_lora_case(item) -> bool:
    configs = set(_CONFIG_IN_ID.findall(item.nodeid.rsplit("[", 1)[-1])) if "[" in item.nodeid else set()
    if configs:
        return configs == {"Lora"}
    return "lora" in item.nodeid.lower()


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--lora-only"):
        return
    keep = [item for item in items if _is_lora_case(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _is_lora_case(item)])
    items[:] = keep


def _keep_hub_offline(config) -> None:
    """PEFT's ``hub_online_once`` lifts offline mode for a model's first load; offline, that only retries
    connections with back-off for minutes. A no-op in its place keeps such loads failing at once (skipped)."""
    sys.path.insert(0, str(config.rootpath))
    try:
        import tests.testing_utils as testing_utils
    except ImportError:  # not PEFT's test folder
        return

    @contextlib.contextmanager
    def hub_offline(model_id: str):
        yield

    testing_utils.hub_online_once = hub_offline


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _stub_missing_diffusers()
    if config.getoption("--tiny-hub-models"):
        import tiny_hub_models

        tiny_hub_models.install()
    if os.environ["HF_HUB_OFFLINE"] == "1":
        _keep_hub_offline(config)
    if PATCH:
        _install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and report.when in ("setup", "call"):
        text = f"{call.excinfo.typename}: {call.excinfo.value}"
        if any(marker in text for marker in _HUB_ERRORS):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, "needs the Hugging Face hub (offline)")


def pytest_terminal_summary(terminalreporter):
    mode = "patched" if PATCH else "unpatched (LORAFAST_PEFT_PATCH=0)"
    terminalreporter.write_line(
        f"lorafast PEFT suite, {mode}: {_counts['models']} models through patch_peft, "
        f"{_counts['patched_layers']} patched layers, {_counts['fused_calls']} fused LoRA and DoRA calls"
    )
