"""The package's exceptions: one base class, each subclassing the builtin it refines."""


class MoleculeError(Exception):
    """Base class of every error molecule_gpt raises on purpose."""


class ConfigError(MoleculeError, ValueError):
    """A Config field has a value the model cannot run with. The message names the field."""


class ArenaOverflowError(MoleculeError, ValueError):
    """A run needs more tape memory than the arena sized from the config holds.

    The arena is sized for `batch_size` sequences of up to `block_size` positions (plus the
    vocabulary and delta modules). Larger batches are split into runs that fit, so this is
    the guard behind that split (a run that would overflow raises instead of writing past
    the arena), not something a valid batch meets."""


class CheckpointError(MoleculeError, ValueError):
    """A checkpoint file could not be read or written; the message names the file and the cause."""


class TokenizerError(MoleculeError, ValueError):
    """Tokenizer input or state is invalid."""


class GenerationError(MoleculeError, ValueError):
    """A generation request cannot be served: a sampling parameter or override is invalid, a
    logits processor returned something unusable, or every token was filtered out."""


class OrganismError(MoleculeError):
    """Base class of the Organism's own errors (corpus, training state, background thread)."""


class CorpusError(OrganismError, ValueError):
    """The corpus given to an Organism is unusable (empty, wrong type, unreadable file)."""


class TrainingError(OrganismError, RuntimeError):
    """Training cannot proceed or failed: e.g. the background trainer died (the original
    exception is chained), or a burst was requested before there is anything to train on."""


class MemoryStoreError(MoleculeError):
    """The SQLite memory (messages, corpus events, growth snapshots) could not be opened, read or
    written: the database is locked by another process, the file is corrupt or not a database,
    or the disk is full. The message names the file and says what to do."""


class InvalidTextWarning(UserWarning):
    """Text given to the organism held characters that are not valid Unicode (undecodable bytes
    read with "surrogateescape", or lone surrogates); they were replaced with U+FFFD and the
    rest was stored (see molecule_gpt.text)."""
