"""gpt2_flax: train your own GPT-2 from scratch in JAX/Flax, on a laptop CPU or a Cloud TPU pod,
and hand it to PyTorch users.

    from gpt2_flax import train_tokenizer, TokenDataset, build_gpt2_config, GPT2
"""

from gpt2_flax.api import GPT2, build_gpt2_config
from gpt2_flax.config import Config, ConfigError, load_config
from gpt2_flax.data import TokenDataset
from gpt2_flax.model import GPT2LMHeadModel
from gpt2_flax.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "GPT2",
    "Config",
    "ConfigError",
    "GPT2LMHeadModel",
    "TokenDataset",
    "build_gpt2_config",
    "load_config",
    "load_tokenizer",
    "train_tokenizer",
]
__version__ = "0.1.0"
