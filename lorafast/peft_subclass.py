"""The classes ``patch_peft`` gives PEFT's layers: PEFT's own class with lorafast's ``forward``."""

from __future__ import annotations

from collections.abc import Callable


def peft_subclass(peft_class: type, forward: Callable, module: str, runs: str) -> type:
    """A subclass of ``peft_class`` whose ``forward`` is ``forward``. It keeps PEFT's class name, so reprs read as
    PEFT's, and is ``<module>.PeftFused<name>`` for pickle (``module``'s ``__getattr__`` builds it on first use)."""
    name = peft_class.__name__
    return type(
        name,
        (peft_class,),
        {
            "forward": forward,
            "__module__": module,
            "__qualname__": f"PeftFused{name}",
            "__doc__": f"PEFT's {name} whose forward runs lorafast's {runs} (see patch_peft).",
        },
    )
