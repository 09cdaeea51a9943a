"""gpt2_flax: train your own GPT-2 from scratch in JAX/Flax, on a laptop CPU or a Cloud TPU pod,
and hand it to PyTorch users.

    from gpt2_flax import train_tokenizer, TokenDataset, build_gpt2_config, GPT2

Names are imported on first use: `import gpt2_flax` alone costs nothing, and the token encoder's
worker processes do not pay for jax and transformers (about 380 MB of memory).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_EXPORTS = {
    "GPT2": "gpt2_flax.api",
    "build_gpt2_config": "gpt2_flax.model",
    "GPT2LMHeadModel": "gpt2_flax.model",
    "Config": "gpt2_flax.config",
    "ConfigError": "gpt2_flax.config",
    "TrainingError": "gpt2_flax.checkpoint",
    "load_config": "gpt2_flax.config",
    "TokenDataset": "gpt2_flax.data",
    "merge_datasets": "gpt2_flax.data",
    "StreamingDataset": "gpt2_flax.data",
    "load_tokenizer": "gpt2_flax.tokenizer",
    "train_tokenizer": "gpt2_flax.tokenizer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def _lazy_exports(module: str, exports: dict[str, str]) -> tuple[Any, Any]:
    """A package's `__getattr__` and `__dir__` that import each of `exports` from its module on first use."""
    namespace = sys.modules[module].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
