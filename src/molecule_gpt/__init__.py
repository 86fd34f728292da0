"""molecule_gpt: a small continually-learning GPT organism with a fast Cython core.

This is the public API; everything else is internal.
"""
from .config import Config as Config
from .model import Model as Model
from .errors import (
    ArenaOverflowError as ArenaOverflowError,
    CheckpointError as CheckpointError,
    ConfigError as ConfigError,
    MoleculeError as MoleculeError,
    TokenizerError as TokenizerError,
)

__version__ = "0.1.0"

__all__ = [
    "ArenaOverflowError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "Model",
    "MoleculeError",
    "TokenizerError",
]
