"""molecule_gpt: a small continually-learning GPT organism with a fast Cython core.

This is the public API; everything else is internal.
"""
from .checkpoint import (
    Checkpoint as Checkpoint,
    CheckpointWarning as CheckpointWarning,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from .config import Config as Config
from .field import CorpusField as CorpusField
from .generation import (
    DecodeLoop as DecodeLoop,
    GenerationResult as GenerationResult,
    Generator as Generator,
    SamplingParams as SamplingParams,
    SubmittedGeneration as SubmittedGeneration,
)
from .data import default_home as default_home, seed_corpus_lines as seed_corpus_lines
from .memory import ForgetCounts as ForgetCounts, Memory as Memory, Recall as Recall
from .model import Model as Model
from .organism import Organism as Organism
from .reservoir import Reservoir as Reservoir
from .trainer import ActivationCollapseWarning as ActivationCollapseWarning, BurstReport as BurstReport
from .tokenizer import (
    EvolvingTokenizer as EvolvingTokenizer,
    StreamDecoder as StreamDecoder,
    TokenizerUpdate as TokenizerUpdate,
    read_corpus as read_corpus,
)
from .errors import (
    ArenaOverflowError as ArenaOverflowError,
    CheckpointError as CheckpointError,
    ConfigError as ConfigError,
    CorpusError as CorpusError,
    GenerationError as GenerationError,
    InvalidTextWarning as InvalidTextWarning,
    MemoryStoreError as MemoryStoreError,
    MoleculeError as MoleculeError,
    OrganismError as OrganismError,
    TokenizerError as TokenizerError,
    TrainingError as TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationCollapseWarning",
    "ArenaOverflowError",
    "BurstReport",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "Config",
    "ConfigError",
    "CorpusError",
    "CorpusField",
    "DecodeLoop",
    "EvolvingTokenizer",
    "ForgetCounts",
    "GenerationError",
    "GenerationResult",
    "InvalidTextWarning",
    "Generator",
    "Memory",
    "MemoryStoreError",
    "Model",
    "MoleculeError",
    "Organism",
    "OrganismError",
    "Recall",
    "Reservoir",
    "SamplingParams",
    "StreamDecoder",
    "SubmittedGeneration",
    "TokenizerError",
    "TokenizerUpdate",
    "TrainingError",
    "default_home",
    "load_checkpoint",
    "read_corpus",
    "save_checkpoint",
    "seed_corpus_lines",
]
