"""Retrofit a Hugging Face decoder (Llama family, GPT-2) into a Mixture-of-Depths model.

Legend: B batch, T time, K routed tokens per sequence, D model width, V vocabulary,
Dh head width.

`retrofit(hf_model, routing)` patches a loaded `transformers` causal LM in place: every layer that
`routing` routes (every other one by default, paper Sec 4.1) is replaced in the model's
`ModuleList` by a `MoDLayer` that holds the original layer (its pretrained weights untouched, its
parameters under the `layer.` prefix), a router and a predictor. It returns a `RetrofitLM`, an
`nn.Module` with `MoDLM`'s forward contract, so modlm's trainer, evaluation, checkpoints and resume
work on it unchanged (`TrainConfig.retrofit`, or `modlm train --set retrofit.source=HF_FOLDER`).

`RetrofitLM` drives the Hugging Face backbone layer by layer with Hugging Face's own modules
(embeddings, rotary table, decoder layers, final norm, LM head) and mask utilities. A routed layer
is a `modlm.block.RoutedLayer`, the same routed update as modlm's `RoutedBlock` (paper Sec 3.4,
Eq. 1): score every token, take each sequence's top-k (or, in the causal modes of Sec 3.5, each
token's own decision), gather only the chosen tokens in time order, run the original decoder layer
on them alone with a causal mask over the gathered axis and their true positions (Llama's cos/sin
at the chosen positions; GPT-2 adds its positions before the first layer), weight the layer's
update (output - input) and scatter-add it back. Unchosen tokens pass through bit for bit; nothing
is computed for them.

Generation: `RetrofitLM` is a `modlm.generate.Backbone`, so modlm's engine (`Engine(model, mode)`,
`modlm sample`, and Hugging Face `generate` through `modlm.hf.modeling.from_modlm(model)`) runs it
with the KV cache that holds only routed tokens. The engine drives every decoder layer through
`modlm.block.DecoderLayer` (families.py: the layer's own modules in pieces, grouped-query
attention over its cache); tests hold prefill + decode equal to the full forward.

The families a model can come from, and how each backbone is driven: families.py. How far a
retrofitted model starts from the original: closeness.py.

Starting close to the original (our choice; the paper trains from scratch): by default the weight
on a routed update is `2 * sigmoid(g * r)` with a learned gain g per routed layer that starts at 0
(`identity_init`), so every routed token's update has weight exactly 1 at the start. At capacity
1.0 the retrofitted model then computes the original model's logits up to float rounding (a test
checks it); below 1.0 the skipped tokens and the smaller attention context move the outputs
(measured in docs/design.md). The router vector gets no LM-loss gradient until g leaves 0, but it
learns from the auxiliary BCE loss from the first step, and g from the LM loss.

Padding: `forward(..., attention_mask_BT=...)` takes a 2-D padding mask (1 = real token, left or
right padding). Positions count real tokens only, padding is never routed, and each row's top-k is
taken over its real tokens, so a padded batch computes what its rows compute alone.

Not supported: Hugging Face's own `forward` / `generate` on the patched model itself (a routed
layer needs the routing inputs only `RetrofitLM` provides, and Hugging Face's cache would not
skip tokens): a patched layer called by Hugging Face raises `RetrofitError` naming `from_modlm`.
Attention implementations: "sdpa" and "eager" (what Hugging Face offers on CPU); sliding-window
models only for sequences within their window.

Importing this module loads nothing from `transformers`; building or loading a model does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modlm import untrusted
from modlm.block import DecoderLayer, LayerRouting, RoutedLayer, RoutingMode
from modlm.config import (
    ATTN_IMPLEMENTATIONS,
    AttnImplementation,
    ModelConfig,
    RetrofitConfig,
    RetrofitTrain,
    RoutingConfig,
    TrainConfig,
)
from modlm.hf.closeness import Closeness, measure_closeness  # noqa: F401  (moved; importable here)
from modlm.hf.families import (
    SUPPORTED_MODEL_TYPES,
    Family,
    RetrofitError,
    causal_mask,
    family_of,
    sliding_window,
)
from modlm.model import ModelOutput, assemble_output, check_token_inputs
from modlm.router import LinearRouter, Predictor
from modlm.tokenizer import Tokenizer

# ---- the routed layer --------------------------------------------------------------------------

class MoDLayer(RoutedLayer):
    """A Hugging Face decoder layer behind a router: it computes only the tokens routed into it.

    `layer` is the original layer (same module, same weights); `router` scores tokens (Sec 3.4);
    `predictor` learns top-k membership from stop-gradient inputs (Sec 3.5, fix 2); `gain` (with
    identity_init) scales the router logit inside the update weight and starts at 0. The routed
    update is modlm's (`RoutedLayer`, Eq. 1); f is the layer's own modules driven through `inner`
    (families.py), in the full forward and in generation alike, so both compute the same thing in
    every dtype.
    """

    def __init__(self, layer: nn.Module, index: int, cfg: ModelConfig, identity_init: bool,
                 family: Family, hf_config: Any) -> None:
        super().__init__(cfg, index, gain=identity_init)
        self.layer = layer
        self._step = family.step(layer, hf_config)

    @property
    def inner(self) -> DecoderLayer:
        return self._step

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any
                ) -> tuple[Tensor, LayerRouting]:
        if args and callable(args[0]):
            return super().forward(hidden_states, *args, **kwargs)
        raise RetrofitError(
            f"layer {self.index} was retrofitted with a Mixture-of-Depths router and runs only "
            f"inside modlm.hf.retrofit.RetrofitLM, which gives it the routing inputs; Hugging "
            f"Face's own forward and generate would run it without them and without a cache "
            f"that skips tokens. Use RetrofitLM.forward(ids, mode=...), modlm's Engine, or wrap "
            f"the model for Hugging Face generate: modlm.hf.from_modlm(retrofitted).generate(...)")


# ---- the retrofitted model ---------------------------------------------------------------------

class RetrofitLM(nn.Module):
    """A Hugging Face causal LM with MoD routers on some layers, with `MoDLM`'s forward contract.

    `hf` is the patched Hugging Face model (state-dict keys `hf.<its own names>`); `cfg` is a
    `ModelConfig` mirroring its shape (width, depth, heads, MLP, vocabulary, context) with the
    routing, which modlm's trainer, evaluation, FLOP accounting and checkpoints read. The mirror
    describes FLOPs approximately: it counts full multi-head key/value projections (no grouped
    queries), no biases and no learned position table.
    """

    def __init__(self, hf_model: nn.Module, routing_cfg: RoutingConfig | None = None, *,
                 identity_init: bool = True) -> None:
        super().__init__()
        hf_config = hf_model.config
        self.family = family_of(hf_config)
        impl = getattr(hf_config, "_attn_implementation", None)
        if impl not in ATTN_IMPLEMENTATIONS:
            raise RetrofitError(f"attention implementation {impl!r} is not supported; load the "
                                f"model with attn_implementation='sdpa' or 'eager'")
        self.cfg = model_config_for(hf_config, routing_cfg or RoutingConfig())
        self.identity_init = identity_init
        self.hf = hf_model
        layers = self.family.layers(hf_model)
        if any(isinstance(l, MoDLayer) for l in layers):
            raise RetrofitError("this Hugging Face model is already retrofitted; load a fresh "
                                "copy of the original to retrofit it again")
        for i in self.cfg.routed_layers:
            layers[i] = MoDLayer(layers[i], i, self.cfg, identity_init, self.family, hf_config)
        # Unrouted layers behind the same interface, for the generation engine.
        self._steps = [l if isinstance(l, MoDLayer) else self.family.step(l, hf_config)
                       for l in layers]
        self._init_routers()
        self.train(hf_model.training)     # a model loaded for inference stays in eval mode

    def _init_routers(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, LinearRouter):
                # As MoDLM (docs/design.md): distinct scores from the first step.
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(self.cfg.d_model))
            elif isinstance(m, Predictor):
                nn.init.normal_(m.fc.weight, 0.0, std)
                nn.init.normal_(m.head.weight, 0.0, std)

    @property
    def hf_config(self) -> Any:
        return self.hf.config

    def run_config(self) -> RetrofitConfig:
        """The `RetrofitConfig` that rebuilds this architecture (no source folder needed)."""
        return RetrofitConfig(attn_implementation=self.hf.config._attn_implementation,
                              identity_init=self.identity_init,
                              hf_config=_portable(self.hf.config.to_dict()))

    def routed_layers(self) -> list[MoDLayer]:
        return [l for l in self.family.layers(self.hf) if isinstance(l, MoDLayer)]

    def routing_parameters(self) -> list[nn.Parameter]:
        """What MoD adds to the pretrained model: routers, predictors, gains."""
        pretrained = {id(p) for l in self.routed_layers() for p in l.layer.parameters()}
        return [p for l in self.routed_layers() for p in l.parameters()
                if id(p) not in pretrained]

    def set_trainable(self, train: RetrofitTrain) -> None:
        """requires_grad for `retrofit.train`: the routing parameters alone, or everything."""
        routing_ids = {id(p) for p in self.routing_parameters()}
        for p in self.parameters():
            p.requires_grad_(train == "all" or id(p) in routing_ids)

    def parameter_lr_scales(self, lr: float, pretrained_lr: float | None) -> dict[int, float]:
        """Per-parameter multipliers of the run's learning rate: the pretrained weights train at
        pretrained_lr (None: lr), the routing parameters at lr (build_optimizer's lr_scales)."""
        routing_ids = {id(p) for p in self.routing_parameters()}
        scale = 1.0 if pretrained_lr is None else pretrained_lr / lr
        return {id(p): 1.0 if id(p) in routing_ids else scale for p in self.parameters()}

    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None,
                mode: RoutingMode = "topk", generator: torch.Generator | None = None,
                attention_mask_BT: Tensor | None = None) -> ModelOutput:
        """Logits (and losses, given targets; target -1 is ignored) for token ids idx_BT.

        attention_mask_BT: optional padding mask (1 or True = real token), left or right padded.
        """
        logits_BTV, stats = self._run(idx_BT, targets_BT, mode, generator, attention_mask_BT,
                                      dense=False)
        return assemble_output(self.cfg, logits_BTV, targets_BT, tuple(stats))

    @torch.no_grad()
    def original_logits(self, idx_BT: Tensor, attention_mask_BT: Tensor | None = None) -> Tensor:
        """The logits of the original (un-retrofitted) model: every layer on every token."""
        return self._run(idx_BT, None, "topk", None, attention_mask_BT, dense=True)[0]

    def _run(self, idx_BT: Tensor, targets_BT: Tensor | None, mode: str,
             generator: torch.Generator | None, attention_mask_BT: Tensor | None,
             dense: bool) -> tuple[Tensor, list[LayerRouting]]:
        valid_BT = self._check_inputs(idx_BT, targets_BT, mode, attention_mask_BT)
        B, T = idx_BT.shape
        hf, family = self.hf, self.family
        if valid_BT is None:
            pos_BT = torch.arange(T, device=idx_BT.device).expand(B, T)
        else:  # positions count real tokens only (Hugging Face's rule for left padding)
            pos_BT = (valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)
        x_BTD = family.embed(hf, idx_BT, pos_BT)
        pe = family.positions(hf, x_BTD, pos_BT)
        mask = causal_mask(hf.config, x_BTD, valid_BT)
        stats: list[LayerRouting] = []
        for layer in family.layers(hf):
            if isinstance(layer, MoDLayer) and not dense:
                x_BTD, layer_stats = layer(x_BTD, self.encode_positions, mode, generator, pos_BT,
                                           valid_BT)
                stats.append(layer_stats)
            else:
                inner = layer.layer if isinstance(layer, MoDLayer) else layer
                x_BTD = family.call(inner, x_BTD, mask, pos_BT, pe)
        return family.head(hf, x_BTD), stats

    def _check_inputs(self, idx_BT: Tensor, targets_BT: Tensor | None, mode: str,
                      attention_mask_BT: Tensor | None) -> Tensor | None:
        """Validate the inputs; return the padding mask as bool (None when nothing is padded)."""
        check_token_inputs(self.cfg, idx_BT, targets_BT, mode, n_ids=self.embedding_rows())
        window = sliding_window(self.hf.config)
        if window is not None and idx_BT.shape[1] > window:
            raise RetrofitError(f"sequence length {idx_BT.shape[1]} exceeds the model's sliding "
                                f"attention window ({window}); retrofitted models attend over "
                                f"full causal context, so keep sequences within the window")
        if torch.compiler.is_compiling():
            # Value checks read tensors and would break the graph.
            return None if attention_mask_BT is None else attention_mask_BT.bool()
        if attention_mask_BT is None:
            return None
        if attention_mask_BT.shape != idx_BT.shape:
            raise ValueError(f"attention_mask_BT shape {tuple(attention_mask_BT.shape)} must "
                             f"equal the inputs' {tuple(idx_BT.shape)}")
        if attention_mask_BT.dtype != torch.bool:
            if attention_mask_BT.is_floating_point() or not bool(
                    ((attention_mask_BT == 0) | (attention_mask_BT == 1)).all()):
                raise ValueError("attention_mask_BT must hold 1 (real token) or 0 (padding)")
            attention_mask_BT = attention_mask_BT.bool()
        return None if bool(attention_mask_BT.all()) else attention_mask_BT

    def embedding_rows(self) -> int:
        """How many token ids the input embedding takes."""
        return self.hf.get_input_embeddings().num_embeddings

    # ---- what the generation engine drives (modlm.generate.Backbone) ---------------------------

    @property
    def context_length(self) -> int:
        """The most tokens a row may hold: the model's positions, or its attention window."""
        window = sliding_window(self.hf.config)
        return self.cfg.max_seq_len if window is None else min(self.cfg.max_seq_len, window)

    def embed_tokens(self, idx_BT: Tensor, pos_BT: Tensor) -> Tensor:
        return self.family.embed(self.hf, idx_BT, pos_BT)

    def encode_positions(self, pos: Tensor) -> Any:
        like = self.hf.get_input_embeddings().weight   # dtype and device of the rotary table
        return self.family.positions(self.hf, like, pos)

    def decoder_layers(self) -> list[Any]:
        return list(self._steps)

    def head(self, x_BTD: Tensor) -> Tensor:
        return self.family.head(self.hf, x_BTD)

    @torch.no_grad()
    def generate(self, idx_BT: Tensor, max_new_tokens: int, mode: RoutingMode = "router",
                 temperature: float = 0.0, attention_mask_BT: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue each row by `max_new_tokens` tokens in a causal routing mode, with modlm's
        generation engine (`modlm.generate.Engine`: the KV cache of a routed layer holds only the
        tokens routed into it). For stop tokens, streaming, statistics and per-row seeds use the
        engine itself.

        Left-pad prompts of different lengths and pass their attention_mask_BT. temperature 0 is
        greedy; `generator` seeds the samples. Returns the prompts with the new tokens appended,
        (B, T + max_new_tokens).
        """
        from modlm.generate import Engine, GenerationError
        valid_BT = self._check_inputs(idx_BT, None, mode, attention_mask_BT)
        if valid_BT is not None and bool((valid_BT[:, :-1] & ~valid_BT[:, 1:]).any()):
            raise RetrofitError("generate takes left-padded prompts (the new tokens are appended "
                                "at the right); pad on the left or use modlm's Engine with a "
                                "list of prompts")
        rows = [r[m].tolist() for r, m in zip(idx_BT, valid_BT)] if valid_BT is not None \
            else idx_BT.tolist()
        seed = None if generator is None else int(torch.randint(
            0, 2**31, (), generator=generator))
        try:
            result = Engine(self, mode).generate(rows, max_new_tokens, temperature=temperature,
                                                 seed=seed)
        except GenerationError as e:
            raise RetrofitError(str(e)) from None
        new_BN = torch.tensor(result.tokens, dtype=idx_BT.dtype, device=idx_BT.device)
        return torch.cat([idx_BT, new_BN], dim=1)

    def num_parameters(self) -> int:
        """Trainable parameters, counting tied embeddings once."""
        return sum(p.numel() for p in self.parameters())


# ---- configs -----------------------------------------------------------------------------------

def model_config_for(hf_config: Any, routing_cfg: RoutingConfig) -> ModelConfig:
    """A `ModelConfig` with the Hugging Face model's shape and the given routing (the mirror
    modlm's trainer, evaluation, FLOP accounting and checkpoints read)."""
    family_of(hf_config)
    c = hf_config
    if c.model_type == "gpt2":
        d = c.n_embd
        shape = dict(vocab_size=c.vocab_size, d_model=d, n_layers=c.n_layer, n_heads=c.n_head,
                     d_mlp=c.n_inner or 4 * d, mlp="gelu", max_seq_len=c.n_positions,
                     tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
                     norm_eps=c.layer_norm_epsilon, init_std=c.initializer_range)
    else:
        d = c.hidden_size
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        shape = dict(vocab_size=c.vocab_size, d_model=d, n_layers=c.num_hidden_layers,
                     n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, mlp="swiglu",
                     max_seq_len=c.max_position_embeddings, rope_theta=float(theta),
                     tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                     norm_eps=c.rms_norm_eps, init_std=c.initializer_range)
    heads = shape["n_heads"]
    if d % heads or (d // heads) % 2:
        # ModelConfig wants an even head width for its own rotary layers; FLOP accounting does
        # not depend on the head count, so the mirror takes one head.
        shape["n_heads"] = 1
    if routing_cfg.router == "attention":
        raise RetrofitError("routing.router='attention' (A-MoD) needs the previous layer's "
                            "attention matrix, which retrofitted Hugging Face layers do not "
                            "expose; use router 'learned', 'threshold' or 'random'")
    if routing_cfg.kv_capacity is not None:
        raise RetrofitError("a retrofitted model routes keys and values with its queries; set "
                            "routing.kv_capacity to null (decoupled key/value routing is for "
                            "modlm models)")
    if isinstance(routing_cfg.layers, tuple):
        bad = [i for i in routing_cfg.layers if not 0 <= i < shape["n_layers"]]
        if bad:
            raise RetrofitError(f"routing.layers has layer indices {bad} outside "
                                f"0..{shape['n_layers'] - 1} of this {c.model_type} model")
    return ModelConfig(**shape, routing=routing_cfg)


def hf_config_from_dict(d: Mapping[str, Any]) -> Any:
    """A Hugging Face config object from its dict (as `config.to_dict()` wrote it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RetrofitError(f"cannot retrofit a Hugging Face model of type {model_type!r}: "
                            f"supported are {SUPPORTED_MODEL_TYPES}")
    return CONFIG_MAPPING[model_type].from_dict(dict(d))


def declared_layers(d: Mapping[str, Any]) -> list[Any]:
    """The layer counts a Hugging Face config dict declares, under any family's name (checked
    against a weights file before a model is built: modlm.untrusted.build_to_fit)."""
    return [d[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in d]


# ---- building ----------------------------------------------------------------------------------

def retrofit(hf_model: nn.Module, routing_cfg: RoutingConfig | None = None, *,
             identity_init: bool = True) -> RetrofitLM:
    """Patch `hf_model` in place (routed layers wrapped, every weight kept) and return the
    `RetrofitLM` that drives it. Router initialisation draws from torch's global generator."""
    return RetrofitLM(hf_model, routing_cfg, identity_init=identity_init)


def load_hf_model(folder: str | os.PathLike[str],
                  attn_implementation: AttnImplementation = "sdpa") -> nn.Module:
    """A Hugging Face causal LM from a local folder or a named source (modlm.hf.sources; never
    downloaded), float32, on the CPU."""
    from modlm.hf.sources import resolve_source
    path = Path(resolve_source(folder))
    if not (path / "config.json").is_file():
        raise RetrofitError(f"{folder} is not a Hugging Face model folder (no config.json); "
                            f"pass a local folder written by save_pretrained (models are never "
                            f"downloaded)")
    _check_attn(attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM
    untrusted.read_json(path / "config.json", "model config")   # bounded before transformers
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    family_of(hf_config)   # a clear error before the weights are read
    shapes = untrusted.folder_weights_shapes(path)
    if shapes:   # a folder from someone else: its config must not ask for more than it holds
        untrusted.check_parameter_total(
            lambda: AutoModelForCausalLM.from_config(hf_config), shapes,
            where=f"model folder {path}", layer_counts=declared_layers(hf_config.to_dict()))
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation,
        dtype=torch.float32)


def from_pretrained(folder: str | os.PathLike[str], routing_cfg: RoutingConfig | None = None, *,
                    attn_implementation: AttnImplementation = "sdpa",
                    identity_init: bool = True) -> RetrofitLM:
    """Load a Hugging Face causal LM from a local folder and retrofit it."""
    return retrofit(load_hf_model(folder, attn_implementation), routing_cfg,
                    identity_init=identity_init)


def from_hf_config(hf_config: Mapping[str, Any] | Any, routing_cfg: RoutingConfig | None = None,
                   *, attn_implementation: AttnImplementation = "sdpa",
                   identity_init: bool = True) -> RetrofitLM:
    """A retrofitted model with this architecture and random weights (to load a state into)."""
    _check_attn(attn_implementation)
    from transformers import AutoModelForCausalLM
    if isinstance(hf_config, Mapping):
        hf_config = hf_config_from_dict(hf_config)
    hf_model = AutoModelForCausalLM.from_config(hf_config,
                                                attn_implementation=attn_implementation,
                                                dtype=torch.float32)
    return retrofit(hf_model, routing_cfg, identity_init=identity_init)


def _check_attn(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise RetrofitError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS} (what "
                            f"Hugging Face offers on CPU), got {attn_implementation!r}")


def build_for_training(cfg: TrainConfig, tokenizer: Tokenizer, *, pretrained: bool
                       ) -> tuple[TrainConfig, RetrofitLM]:
    """The trainer's hook (modlm.train): the retrofitted model and the TrainConfig resolved for it
    (`model` = the mirror config, `retrofit.hf_config` recorded). `pretrained` loads the weights
    of `retrofit.source` (a new run); otherwise the architecture comes from the recorded
    `retrofit.hf_config` and the weights from the checkpoint being resumed."""
    retro = cfg.retrofit
    options = dict(attn_implementation=retro.attn_implementation,
                   identity_init=retro.identity_init)
    if pretrained:
        if retro.source is None:
            raise RetrofitError("a new retrofit run needs retrofit.source (a local Hugging Face "
                                "model folder); retrofit.hf_config is recorded by the trainer")
        model = from_pretrained(retro.source, cfg.model.routing, **options)
    else:
        model = from_hf_config(retro.hf_config or _read_source_config(retro.source),
                               cfg.model.routing, **options)
    mirror = model.cfg
    if tokenizer.vocab_size > model.embedding_rows():
        raise RetrofitError(f"the {cfg.data.tokenizer} tokenizer has {tokenizer.vocab_size} ids "
                            f"but the Hugging Face model embeds {model.embedding_rows()}; "
                            f"pick the tokenizer the model was trained with (data.tokenizer)")
    if cfg.data.seq_len > mirror.max_seq_len:
        raise RetrofitError(f"data.seq_len ({cfg.data.seq_len}) exceeds the Hugging Face model's "
                            f"{mirror.max_seq_len} positions; lower data.seq_len")
    model.set_trainable(retro.train)
    if not any(p.requires_grad for p in model.parameters()):
        raise RetrofitError("nothing to train: retrofit.train='routing' trains the routers, "
                            "predictors and gains, and this routing has none (a random router "
                            "or no routed layer); evaluate the model as it is (modlm retrofit), "
                            "or set retrofit.train=all")
    recorded = dataclasses.replace(retro, hf_config=_portable(model.hf.config.to_dict()))
    return dataclasses.replace(cfg, model=mirror, retrofit=recorded), model


def _portable(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config dict without the local folder it was read from (a run or an export
    describes the architecture, not where its source lay on someone's disk)."""
    return {k: v for k, v in hf_config.items() if k != "_name_or_path"}


def _read_source_config(source: str | None) -> dict[str, Any]:
    if source is None:
        raise RetrofitError("retrofit needs retrofit.source (a local Hugging Face model folder)")
    from transformers import AutoConfig

    from modlm.hf.sources import resolve_source
    return AutoConfig.from_pretrained(resolve_source(source), local_files_only=True).to_dict()


def planned_model(cfg: TrainConfig) -> tuple[ModelConfig, Callable[[], RetrofitLM]]:
    """What a retrofit TrainConfig will train, from the source's config.json alone (no weights
    read): (the mirror ModelConfig, a function building the model with random weights and the
    run's trainable set), for plans and counts made before a run starts."""
    retro = cfg.retrofit
    hf_config = hf_config_from_dict(retro.hf_config or _read_source_config(retro.source))

    def build() -> RetrofitLM:
        model = from_hf_config(hf_config, cfg.model.routing,
                               attn_implementation=retro.attn_implementation,
                               identity_init=retro.identity_init)
        model.set_trainable(retro.train)
        return model
    return model_config_for(hf_config, cfg.model.routing), build


def model_from_run_config(model_cfg: ModelConfig, retrofit_section: Mapping[str, Any]
                          ) -> RetrofitLM:
    """The (untrained) retrofitted model a checkpoint's config describes, for loading its weights
    (modlm.checkpoint.load_model)."""
    retro = RetrofitConfig(**retrofit_section)
    model = from_hf_config(retro.hf_config, model_cfg.routing,
                           attn_implementation=retro.attn_implementation,
                           identity_init=retro.identity_init)
    if model.cfg != model_cfg:
        raise RetrofitError("the checkpoint's model config does not match its recorded Hugging "
                            "Face config; the checkpoint was edited or written by another version")
    return model
