"""Config: every hyperparameter of the organism, validated at construction.

Fields are grouped by concern (MODEL, DELTA, TRAINING, BURSTS, HELDOUT, IMMUNE, SAMPLING, DECODE,
FIELD, TOKENIZER, CORPUS, THREADS below); each carries its group, a one-line description and, for the
fields fixed at birth, how it is fixed, in its dataclass metadata: `Config.fields_of(group)`,
`Config.describe(name)`, `Config.shape_fields()` and `Config.fixed_at_birth()` read them, so
what is fixed at birth is said in this one place (Model and the command line derive from it).
The names stay flat: `Config(n_layer=...)`, config-file keys and a checkpoint's
`model.config` use them as they are. Defaults are those of design.md §7. Field names match the
original implementation's "cfg" object so an imported checkpoint maps one to one (runtime
paths such as corpus_path are not config here). Retired fields (RETIRED_FIELDS) are accepted
and ignored when read from a file or a checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

HEAD_TYPES = ("content", "rrpram", "hybrid")
MLP_ACTIVATIONS = ("relu", "silu")
DECODE_PRECISIONS = ("model", "bfloat16")

# How a field is fixed at birth (metadata "fixed"):
SHAPE = "shape"  # fixes parameter shapes: a built Model refuses a change (Model._SHAPE_FIELDS)
INIT = "init"  # how parameters are drawn: an organism keeps it for life, like the shapes

GROUPS = ("model", "delta", "training", "bursts", "heldout", "immune", "sampling", "decode", "field", "tokenizer",
          "corpus", "threads")

# Fields earlier versions had, with the value they had; old config files and checkpoints that
# name them still load (silently, the value ignored). The original program's JSON has them too.
RETIRED_FIELDS = {"min_new_chars_to_train": 480,  # never read by anything
                  "immune_val_bound": 0.05}  # replaced by immune_max_rise (a fraction, per character)


def _group(name: str):
    assert name in GROUPS

    def make(default, doc: str, *, fixed: str | None = None):
        return field(default=default, metadata={"group": name, "doc": doc, "fixed": fixed})
    return make


MODEL, DELTA, TRAINING, BURSTS, HELDOUT, IMMUNE, SAMPLING, DECODE, FIELD, TOKENIZER, CORPUS, THREADS = map(_group, GROUPS)


@dataclass
class Config:
    # ---- model: shapes and init (design.md §2); fixed at birth
    n_layer: int = MODEL(2, "transformer blocks", fixed=SHAPE)
    n_embd: int = MODEL(72, "residual width C", fixed=SHAPE)
    n_head: int = MODEL(4, "heads per layer; head dim d = n_embd / n_head (must be even for RoPE)", fixed=SHAPE)
    block_size: int = MODEL(96, "context window T, also the rows of wpe and of each w_pattern", fixed=SHAPE)
    head_types: tuple = MODEL(("content", "content", "hybrid", "hybrid"),
                              "one per head: content, rrpram or hybrid", fixed=SHAPE)
    mlp_activation: str = MODEL("relu", 'gate of the MLP: "relu" (original) or "silu"', fixed=SHAPE)
    tie_embeddings: bool = MODEL(True, "lm_head is the wte matrix itself (one array, one gradient)", fixed=SHAPE)
    hybrid_alpha_init: float = MODEL(0.5, "raw alpha of hybrid heads at init; the mix is sigmoid(alpha)", fixed=INIT)
    init_std: float = MODEL(0.08, "std of base matrices at init (and of vocabulary rows grown later)", fixed=INIT)
    delta_init_std: float = MODEL(0.02, "std of delta factors A and B at init (original)", fixed=INIT)

    # ---- delta modules (design.md §8.3)
    delta_rank: int = DELTA(8, "rank r of each low-rank adapter", fixed=SHAPE)
    max_delta_modules: int = DELTA(12, "modules an organism may accumulate")
    delta_grow_prob: float = DELTA(0.08, "chance of appending a module after an accepted burst")
    delta_ramp_bursts: int = DELTA(1, "a new module's alpha rises linearly to 1 over its first bursts (1: at once)")

    # ---- training: optimizer and warmup (design.md §3)
    warmup_steps: int = TRAINING(1200, "steps on the seed corpus before chatting")
    learning_rate: float = TRAINING(0.01, "peak learning rate of the warmup schedule")
    lr_warmup_steps: int = TRAINING(50, "warmup's learning rate rises linearly over these steps, then cosine-decays")
    lr_min_ratio: float = TRAINING(0.1, "the cosine decay ends at learning_rate * lr_min_ratio")
    beta1: float = TRAINING(0.9, "Adam's first-moment decay")
    beta2: float = TRAINING(0.99, "Adam's second-moment decay")
    eps_adam: float = TRAINING(1e-8, "Adam's epsilon")
    grad_clip: float = TRAINING(1.0, "each gradient element is clipped to +-grad_clip before Adam")
    batch_size: int = TRAINING(4, "sequences per step; sizes the training arena")
    freeze_base_after_warmup: bool = TRAINING(False, "True: after warmup only delta modules train "
                                                     "(bursts then learn less)")
    eval_interval: int = TRAINING(100, "warmup steps between held-out evaluations (and telemetry val_loss)")
    patience: int = TRAINING(0, "evaluations without a min_delta improvement before warmup stops early (0: never)")
    min_delta: float = TRAINING(1e-3, "held-out improvement (nats per character) that resets the patience count")
    warmup_keep_best: bool = TRAINING(True, "the warmup ends on the weights of its best held-out evaluation "
                                            "(not on its last, when training went on past it)")

    # ---- bursts: continual learning after warmup (design.md §3, §7)
    micro_steps: int = BURSTS(32, "optimizer steps per burst")
    burst_learning_rate: float = BURSTS(0.001, "learning rate of a burst (times the rollback back-off)")
    replay_ratio: float = BURSTS(0.75, "share of each burst's sequences drawn from what the organism knew before "
                                       "it (replay)")
    train_tick_seconds: float = BURSTS(0.25, "the background trainer checks the quantum buffer this often")

    # ---- held-out text (design.md §3)
    val_fraction: float = HELDOUT(0.1, "share of the birth corpus held out (none below 10 lines)")
    val_max_sequences: int = HELDOUT(96, "held-out lines of the old text scored per evaluation (a fixed subset, "
                                         "so values compare)")
    heard_val_fraction: float = HELDOUT(0.1, "share of newly heard lines held out (not trained) to measure learning")
    heard_val_max_lines: int = HELDOUT(32, "newest held-out heard lines kept and scored")

    # ---- immune system and identity (design.md §6)
    # a burst raising held-out loss on the old text by more than this fraction is rolled back
    # (harm is a 1% rise; the margin covers the sampling noise of a 96-line estimate, and close
    # calls are judged again on every held-out line)
    immune_max_rise: float = IMMUNE(0.0075, "largest accepted relative rise of old held-out loss in a burst")
    immune_second_look: float = IMMUNE(0.0025, "a burst whose rise lies at most this below immune_max_rise is "
                                              "judged again on every held-out line of the old text (0: never)")
    max_consecutive_rollbacks: int = IMMUNE(3, "this many rollbacks in a row multiply the burst lr by "
                                               "rollback_lr_backoff")
    rollback_lr_backoff: float = IMMUNE(0.5, "lr factor after a rollback streak; each accepted burst divides it "
                                             "back out")
    max_quarantine_lines: int = IMMUNE(2000, "lines of rolled-back bursts kept aside (not trained) until released")
    gamma_sparsity_threshold: float = IMMUNE(0.01, "|gamma| at or below this counts as sparse in gamma_stats()")
    noise_drift_threshold: float = IMMUNE(-0.1, "immune_check() fails below this cosine of identity directions "
                                                "(reported, decides nothing)")
    gamma_min_magnitude: float = IMMUNE(1e-6, "the drift cosine is not measured while either magnitude is below this")
    collapse_std_bound: float = IMMUNE(1e-3, "a layer whose hidden-state std falls below this is reported as "
                                             "collapsed")

    # ---- sampling (design.md §4); generate() overrides any of them per call
    temperature: float = SAMPLING(0.85, "sampling temperature; 0 picks the most likely token (greedy)")
    top_k: int = SAMPLING(40, "keep the k most likely tokens (0: off)")
    top_p: float = SAMPLING(0.92, "keep the most likely tokens until their mass reaches top_p (1: off)")
    min_p: float = SAMPLING(0.06, "drop tokens with p < min_p * max p (0: off)")
    typical_p: float = SAMPLING(0.95, "keep the tokens whose surprisal is nearest the entropy until their mass "
                                      "reaches typical_p (1: off)")
    max_gen_tokens: int = SAMPLING(180, "hard cap on generated tokens")
    min_gen_tokens: int = SAMPLING(16, "no EOS and no sentence-end stop before this many tokens")
    repetition_guard: int = SAMPLING(4, "stop when the last n tokens repeat the n before them (0: off)")
    entropy_low: float = SAMPLING(0.5, "nats; below it the temperature is multiplied by entropy_temp_boost")
    entropy_high: float = SAMPLING(1.5, "nats; above it the temperature is multiplied by entropy_temp_focus")
    entropy_temp_boost: float = SAMPLING(1.2, "temperature factor when the distribution is peaked")
    entropy_temp_focus: float = SAMPLING(0.8, "temperature factor when the distribution is flat")

    # ---- the decoder's weights
    decode_precision: str = DECODE("model", 'weights generation reads: "model" (the model\'s own) or "bfloat16" '
                                            '(float32 models: half the bytes per token, rounded to nearest; '
                                            'Organism.decode_precision_report() measures what it costs)')

    # ---- corpus field (design.md §5)
    corpus_gen_max_tokens: int = FIELD(120, "token cap when the field speaks alone (model_alpha 0)")
    field_blend: bool = FIELD(True, "blend the corpus field into generation, at the model weight that "
                                    "predicts held-out text best")

    # ---- tokenizer (design.md §1)
    enable_bpe_after_chars: int = TOKENIZER(25000, "BPE is enabled once the corpus holds this many characters")
    bpe_num_merges: int = TOKENIZER(384, "merges learned per BPE training")
    bpe_retrain_every_chars: int = TOKENIZER(4000, "BPE is retrained after this many new characters")
    bpe_growth_max_rise: float = TOKENIZER(0.005, "a tokenizer growth after training is kept only if old held-out "
                                                  "loss rises less than this fraction")
    bpe_growth_merges: int = TOKENIZER(32, "merges a growth after training appends to the existing ones")
    bpe_growth_steps: int = TOKENIZER(64, "steps that train a growth's new embedding rows before its check")
    bpe_max_vocab: int = TOKENIZER(1024, "growth after training appends merges only while the vocabulary is "
                                         "smaller than this")

    # ---- corpus reservoir and quantum buffer (design.md §7)
    max_corpus_lines: int = CORPUS(8000, "lines the reservoir keeps (the newest half, then a sample of older ones)")
    max_line_chars: int = CORPUS(240, "longer lines are split into pieces of at most this many characters")
    qb_min_bytes: int = CORPUS(1024, "new bytes that make the quantum buffer fire a burst")
    qb_min_novelty: float = CORPUS(0.15, "or: distinct / total new tokens at which it fires")
    qb_cooldown_seconds: float = CORPUS(60.0, "seconds between background bursts at least")

    # ---- threads
    train_threads: int = THREADS(0, "training worker threads (0: all cores in warmup, all but one in the "
                                    "background)")
    blas_threads: int = THREADS(1, "BLAS threads while the background trainer runs (0: leave the process setting)")
    decode_threads: int = THREADS(1, "threads one generation splits products of >= 128k weights over (1: none)")
    train_share_while_generating: float = THREADS(0.25, "while generations are in flight, the background "
                                                         "trainer pauses after each step so that its steps take "
                                                         "at most this share of the wall time (1: never pauses)")

    # ---- reading the metadata

    @classmethod
    def fields_of(cls, group: str) -> tuple[str, ...]:
        """The names of the fields of one group (one of GROUPS), in order."""
        if group not in GROUPS:
            raise KeyError(f"no Config group {group!r}; groups are {', '.join(GROUPS)}")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["group"] == group)

    @classmethod
    def describe(cls, name: str) -> str:
        """One line saying what a field is (its group, fixed at birth or not, and what it does)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        fixed = {SHAPE: ", fixed at birth (a parameter shape)", INIT: ", fixed at birth (the init)"}.get(
            f.metadata["fixed"], "")
        return f"{name} ({f.metadata['group']}{fixed}): {f.metadata['doc']}"

    @classmethod
    def shape_fields(cls) -> tuple[str, ...]:
        """Fields that fix the parameters' shapes: a built Model cannot change them."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["fixed"] == SHAPE)

    @classmethod
    def fixed_at_birth(cls) -> tuple[str, ...]:
        """Fields an organism keeps for life: the shapes and how the parameters are drawn."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["fixed"] is not None)

    def __post_init__(self):
        self.head_types = tuple(self.head_types)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first bad field and the fix."""
        positive_ints = ("n_layer", "n_embd", "n_head", "block_size", "delta_rank", "batch_size",
                         "micro_steps", "max_gen_tokens", "max_corpus_lines", "max_line_chars",
                         "bpe_num_merges", "bpe_growth_merges", "bpe_max_vocab")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Config.{name} must be a positive int, got {value!r}")
        non_negative_ints = ("warmup_steps", "max_delta_modules", "min_gen_tokens", "repetition_guard",
                             "top_k", "corpus_gen_max_tokens", "enable_bpe_after_chars",
                             "bpe_retrain_every_chars", "qb_min_bytes")
        for name in non_negative_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Config.{name} must be a non-negative int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"Config.n_embd ({self.n_embd}) must be divisible by Config.n_head ({self.n_head}); "
                f"pick n_embd as a multiple of n_head, e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if self.head_dim % 2:
            raise ConfigError(
                f"head dim n_embd/n_head = {self.head_dim} must be even for RoPE (it rotates pairs); "
                f"change Config.n_embd or Config.n_head so that n_embd/n_head is even")
        if len(self.head_types) != self.n_head:
            raise ConfigError(
                f"Config.head_types has {len(self.head_types)} entries but n_head is {self.n_head}; "
                f"give exactly one type per head")
        for i, kind in enumerate(self.head_types):
            if kind not in HEAD_TYPES:
                raise ConfigError(f"Config.head_types[{i}] is {kind!r}; use one of {', '.join(HEAD_TYPES)}")
        if self.decode_precision not in DECODE_PRECISIONS:
            raise ConfigError(f"Config.decode_precision is {self.decode_precision!r}; use "
                              f"{' or '.join(map(repr, DECODE_PRECISIONS))}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError(f"Config.mlp_activation is {self.mlp_activation!r}; use 'relu' or 'silu'")
        positive_floats = ("learning_rate", "burst_learning_rate", "eps_adam", "grad_clip", "init_std",
                           "entropy_temp_boost", "entropy_temp_focus")
        for name in positive_floats:
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ConfigError(f"Config.{name} must be a positive number, got {value!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ConfigError(f"Config.temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                raise ConfigError(f"Config.{name} must be in [0, 1), got {value!r}")
        for name in ("top_p", "min_p", "typical_p", "delta_grow_prob", "qb_min_novelty"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ConfigError(f"Config.{name} must be in [0, 1], got {value!r}")
        for name in ("delta_init_std", "hybrid_alpha_init", "noise_drift_threshold", "gamma_min_magnitude",
                     "gamma_sparsity_threshold", "entropy_low", "entropy_high", "train_tick_seconds",
                     "qb_cooldown_seconds"):
            value = getattr(self, name)
            if not _is_real(value) or value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"Config.{name} must be a finite number, got {value!r}")
        if self.delta_init_std < 0:
            raise ConfigError(f"Config.delta_init_std must be >= 0, got {self.delta_init_std!r}")
        if self.entropy_low > self.entropy_high:
            raise ConfigError(f"Config.entropy_low ({self.entropy_low}) must not exceed entropy_high ({self.entropy_high})")
        self._validate_organism_fields()

    def _validate_organism_fields(self) -> None:
        for name in ("val_max_sequences", "eval_interval", "delta_ramp_bursts", "decode_threads", "heard_val_max_lines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Config.{name} must be a positive int, got {value!r}")
        for name in ("patience", "lr_warmup_steps", "max_consecutive_rollbacks", "train_threads", "blas_threads",
                     "max_quarantine_lines", "bpe_growth_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Config.{name} must be a non-negative int, got {value!r}")
        for name in ("val_fraction", "lr_min_ratio", "replay_ratio", "heard_val_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ConfigError(f"Config.{name} must be in [0, 1], got {value!r}")
        if not _is_real(self.val_fraction) or self.val_fraction >= 1:
            raise ConfigError(f"Config.val_fraction must be below 1 (some lines must train), got {self.val_fraction!r}")
        for name in ("min_delta", "immune_max_rise", "immune_second_look", "bpe_growth_max_rise", "collapse_std_bound"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < float("inf"):
                raise ConfigError(f"Config.{name} must be a finite number >= 0, got {value!r}")
        if not _is_real(self.train_share_while_generating) or not 0 < self.train_share_while_generating <= 1:
            raise ConfigError(f"Config.train_share_while_generating must be in (0, 1], "
                              f"got {self.train_share_while_generating!r}")
        if not _is_real(self.rollback_lr_backoff) or not 0 < self.rollback_lr_backoff <= 1:
            raise ConfigError(f"Config.rollback_lr_backoff must be in (0, 1], got {self.rollback_lr_backoff!r}")
        if not isinstance(self.field_blend, bool):
            raise ConfigError(f"Config.field_blend must be a bool, got {self.field_blend!r}")

    def replace(self, **changes) -> "Config":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["head_types"] = list(self.head_types)
        return d

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True) -> "Config":
        """Build from a mapping; unknown keys raise ConfigError when strict, are dropped otherwise.
        Retired fields (RETIRED_FIELDS) are dropped silently either way."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(RETIRED_FIELDS))
        if unknown and strict:
            raise ConfigError(f"unknown Config field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
