"""Config: every hyperparameter of the organism, validated at construction.

Defaults follow design.md §7. Field names match the original implementation's "cfg" object so an
imported checkpoint maps one to one (runtime paths such as corpus_path are not config here).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

HEAD_TYPES = ("content", "rrpram", "hybrid")
MLP_ACTIVATIONS = ("relu", "silu")


@dataclass
class Config:
    # ---- model shape
    n_layer: int = 2  # transformer blocks
    n_embd: int = 72  # residual width C
    n_head: int = 4  # heads per layer; head dim d = n_embd / n_head (must be even for RoPE)
    block_size: int = 96  # context window, also the rows of wpe and of each w_pattern
    head_types: tuple = ("content", "content", "hybrid", "hybrid")  # one per head
    mlp_activation: str = "relu"  # gate of the MLP: "relu" (original) or "silu"
    tie_embeddings: bool = True  # lm_head is the wte matrix itself (one array, one gradient)
    hybrid_alpha_init: float = 0.5  # raw alpha of hybrid heads; the mix is sigmoid(alpha)
    init_std: float = 0.08  # std of base matrices at init
    delta_init_std: float = 0.02  # std of delta factors A and B at init (original)

    # ---- delta modules
    delta_rank: int = 8  # rank r of each low-rank adapter
    max_delta_modules: int = 12  # modules an organism may accumulate
    delta_grow_prob: float = 0.08  # chance of appending a module after a burst

    # ---- training
    warmup_steps: int = 1200  # steps on the seed corpus before chatting
    micro_steps: int = 32  # optimizer steps per background burst
    learning_rate: float = 0.01  # peak learning rate of the warmup schedule
    burst_learning_rate: float = 0.001  # learning rate of a burst (times the rollback back-off)
    beta1: float = 0.9
    beta2: float = 0.99
    eps_adam: float = 1e-8
    grad_clip: float = 1.0  # each gradient element is clipped to +-grad_clip before Adam
    freeze_base_after_warmup: bool = False  # True: after warmup only delta modules train (bursts then learn less)
    batch_size: int = 4  # sequences per step; sizes the training arena
    train_tick_seconds: float = 0.25
    min_new_chars_to_train: int = 480

    # ---- generation
    temperature: float = 0.85  # sampling temperature; 0 picks the most likely token (greedy)
    top_k: int = 40
    top_p: float = 0.92
    min_p: float = 0.06
    typical_p: float = 0.95
    max_gen_tokens: int = 180
    min_gen_tokens: int = 16
    repetition_guard: int = 4
    entropy_low: float = 0.5
    entropy_high: float = 1.5
    entropy_temp_boost: float = 1.2
    entropy_temp_focus: float = 0.8
    corpus_gen_max_tokens: int = 120

    # ---- tokenizer
    enable_bpe_after_chars: int = 25000
    bpe_num_merges: int = 384
    bpe_retrain_every_chars: int = 4000

    # ---- identity (measured and reported; bursts are judged by held-out loss, see immune_max_rise)
    gamma_sparsity_threshold: float = 0.01  # |gamma| at or below this counts as sparse in gamma_stats()
    noise_drift_threshold: float = -0.1  # immune_check() fails below this cosine of identity directions
    gamma_min_magnitude: float = 1e-6  # the drift cosine is not measured while either magnitude is below this

    # ---- corpus and quantum buffer
    max_corpus_lines: int = 8000
    max_line_chars: int = 240
    qb_min_bytes: int = 1024
    qb_min_novelty: float = 0.15
    qb_cooldown_seconds: float = 60.0

    # ---- organism: trainer, held-out split, immune system, delta lifecycle, threads
    val_fraction: float = 0.1  # share of the birth corpus held out for val loss (none below 10 lines)
    val_max_sequences: int = 96  # held-out lines of the old text scored per evaluation (a fixed subset, so values compare)
    eval_interval: int = 100  # warmup steps between held-out evaluations (and telemetry "val_loss")
    patience: int = 0  # evaluations without a min_delta improvement before warmup stops early (0: never)
    min_delta: float = 1e-3  # val-loss improvement (nats) that resets the patience count
    lr_warmup_steps: int = 50  # warmup's learning rate rises linearly over these steps, then cosine-decays
    lr_min_ratio: float = 0.1  # the cosine decay ends at learning_rate * lr_min_ratio
    replay_ratio: float = 0.75  # share of each burst's sequences drawn from what the organism knew before it (replay)
    # a burst raising held-out loss on the old text by more than this fraction is rolled back
    # (harm is a 1% rise; the margin covers the sampling noise of a 96-line estimate)
    immune_max_rise: float = 0.0075
    bpe_growth_max_rise: float = 0.005  # a tokenizer growth after training is kept only if old held-out loss rises less
    heard_val_fraction: float = 0.1  # share of newly heard lines held out (not trained) to measure learning
    heard_val_max_lines: int = 32  # newest held-out heard lines kept and scored
    max_quarantine_lines: int = 2000  # lines of rolled-back bursts kept aside (not trained) until released
    max_consecutive_rollbacks: int = 3  # this many rollbacks in a row multiply the burst lr by rollback_lr_backoff
    rollback_lr_backoff: float = 0.5  # lr factor after a rollback streak; each accepted burst divides it back out
    delta_ramp_bursts: int = 1  # a new module's alpha rises linearly to 1 over its first bursts (1: at once)
    collapse_std_bound: float = 1e-3  # a layer whose hidden-state std falls below this is reported as collapsed
    field_blend: bool = True  # blend the corpus field into generation until the model beats it on held-out text
    train_threads: int = 0  # training worker threads (0: all cores in warmup, all but one in the background)
    blas_threads: int = 1  # BLAS threads while the background trainer runs (0: leave the process setting)
    decode_threads: int = 1  # threads one generation splits products of >= 128k weights over (1: none)

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
                         "bpe_num_merges")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Config.{name} must be a positive int, got {value!r}")
        non_negative_ints = ("warmup_steps", "max_delta_modules", "min_gen_tokens", "repetition_guard",
                             "top_k", "corpus_gen_max_tokens", "enable_bpe_after_chars",
                             "bpe_retrain_every_chars", "qb_min_bytes", "min_new_chars_to_train")
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
                     "max_quarantine_lines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Config.{name} must be a non-negative int, got {value!r}")
        for name in ("val_fraction", "lr_min_ratio", "replay_ratio", "heard_val_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ConfigError(f"Config.{name} must be in [0, 1], got {value!r}")
        if not _is_real(self.val_fraction) or self.val_fraction >= 1:
            raise ConfigError(f"Config.val_fraction must be below 1 (some lines must train), got {self.val_fraction!r}")
        for name in ("min_delta", "immune_max_rise", "bpe_growth_max_rise", "collapse_std_bound"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < float("inf"):
                raise ConfigError(f"Config.{name} must be a finite number >= 0, got {value!r}")
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
        """Build from a mapping; unknown keys raise ConfigError when strict, are dropped otherwise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ConfigError(f"unknown Config field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
