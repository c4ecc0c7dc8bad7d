"""Typed, frozen model configuration: the transformer's shape and its Mixture-of-Depths routing.

Everything that changes what a model computes lives here and is validated at construction, so a
bad value fails before any tensor is allocated, with a message that names the field and the fix.
Configs round-trip through JSON (`to_dict` / `from_dict`) and take dotted overrides
(`apply_overrides(cfg, {"routing.capacity": 0.25})`), which is what the CLI's `--set` uses.

Routing follows Raposo et al. 2024 (arXiv:2404.02258): Sec 3.4 for the routed block, Sec 4.1 for
where routers sit and how much capacity they get, Sec 3.5 for the two causal fixes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

RouterKind = Literal["learned", "random", "none"]
RouterWeight = Literal["sigmoid", "raw", "constant"]
RoutedLayers = Union[Literal["every_other", "all", "upper_half", "none"], tuple[int, ...]]
RoutingSkip = Literal["block", "attention"]
MlpKind = Literal["swiglu", "gelu"]
MoELayers = Union[Literal["all", "every_other", "routed", "none"], tuple[int, ...]]

ROUTER_KINDS = ("learned", "random", "none")
ROUTER_WEIGHTS = ("sigmoid", "raw", "constant")
LAYER_PATTERNS = ("every_other", "all", "upper_half", "none")
ROUTING_SKIPS = ("block", "attention")
MLP_KINDS = ("swiglu", "gelu")
MOE_LAYER_PATTERNS = ("all", "every_other", "routed", "none")


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


@dataclass(frozen=True)
class RoutingConfig:
    """Where and how tokens are routed around blocks.

    router:        "learned" (MoD: r = w^T x, Sec 3.4), "random" (the stochastic-routing control of
                   Sec 4.1: top-k of Gaussian scores), or "none" (dense model).
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
    aux_loss_weight: weight of the router's auxiliary BCE loss against top-k membership
                   (Sec 3.5 fix 1). 0 disables it, and with it the causal `router` mode.
    predictor:     train the stop-gradient MLP predictor of top-k membership (Sec 3.5 fix 2).
    predictor_hidden: its hidden width; None means d_model // 8.
    predictor_loss_weight: weight of the predictor's BCE loss. Its gradient reaches only the
                   predictor, so this only scales the predictor's own learning signal.
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
    capacity_factor: per-sequence slots per real expert = ceil(factor * tokens * top_k / choices);
                   overflow tokens get a zero MLP update. Below 1 it is the paper's foil
                   (reduced-capacity MoE, dropping tokens); null means no limit.
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
        caps = self.routing.capacities
        check(caps is None or len(caps) == len(self.routed_layers),
              f"routing.capacities has {len(caps or ())} entries but the model routes "
              f"{len(self.routed_layers)} blocks {list(self.routed_layers)}; give one capacity "
              f"per routed block")
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
