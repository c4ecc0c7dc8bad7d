"""modlm models as Hugging Face transformers models: config, causal-LM wrapper, routed KV cache.

Legend: B batch, T time (of the padded batch), K real tokens of the longest row, N tokens fed
in one decode call, V vocabulary.

- `ModLMConfig` (model_type "modlm"): `modlm` holds `ModelConfig.to_dict()`, the one source of
  truth; the fields Hugging Face tools read (vocab_size, hidden_size, num_hidden_layers, ...)
  mirror it. `routing_mode` is the causal routing rule (paper Sec 3.5) used for evaluation and
  generation: "router" (sigmoid(r) > 0.5) or "predictor"; "topk" is not causal and is refused.
- `ModLMForCausalLM`: holds a `modlm.model.MoDLM` as `model`, so the safetensors file holds
  modlm's own state-dict names under the prefix `model.`; a tied LM head is stored once
  (`_tied_weights_keys`) and tied again on load. With `config.retrofit` (the patched model's
  Hugging Face config, as a retrofit run records it) `model` is a retrofitted Hugging Face model
  (`modlm.hf.retrofit.RetrofitLM`, its weights under `model.hf.`), which generates, saves and
  loads the same way. `save_pretrained` also writes the `trust_remote_code` shim
  (modlm.hf.export), so stock clients load the folder. `from_pretrained` is strict: a missing or
  unexpected weight is an error, never a silently initialised tensor.
- `ModLMCache`: what `generate` carries between steps. It wraps `modlm.generate.Engine`'s
  `DecodeState`, so a routed block's cache holds only the tokens routed into it, a decode step
  runs a routed block only for the rows whose new token routes, and a step in which no row routes
  skips the block (Sec 3.5: "the KV cache of a routed layer holds only the tokens routed into
  it"). `block_entries()` and `routed_fraction()` show what was skipped.

Generation runs transformers' own loop, so GenerationConfig, logits processors, stopping
criteria and streamers all apply. The first forward with an empty `ModLMCache` drops each row's
padding using the attention mask and prefills the engine with the real tokens only, so positions
start at 0 at each row's first real token, exactly as an unpadded run of that row (a padded batch
gives each row's own tokens). Later forwards feed the new tokens through `Engine.decode_step`.
Greedy decoding and sampling only: beam search and assisted decoding are refused, since they
reorder or roll back a cache whose rows hold different numbers of routed tokens.

Forward without a cache (training, evaluation, `generate(use_cache=False)`): the full-sequence
`MoDLM.forward`. Routing mode: an explicit `routing_mode=` argument, else "topk" in training mode
(the paper's training forward, which trains the routers and the aux losses) and
`config.routing_mode` in eval mode; generation always passes `config.routing_mode`. A batch with
padding runs row by row on each row's real tokens (exact in every mode; top-k over a padded row
would let padding compete for capacity). `labels` follow transformers' convention (labels ==
input_ids, the model shifts, -100 is ignored); the returned `loss` is what modlm minimises (LM
loss plus the weighted auxiliary losses), `lm_loss` the LM part alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from modlm import untrusted
from modlm.config import ModelConfig, RetrofitConfig
from modlm.generate import GENERATION_MODES, DecodeState, Engine, GenerationError
from modlm.layers import Rotary
from modlm.model import MoDLM

MODEL_TYPE = "modlm"
_IGNORE = -100                     # transformers' ignored label
_MIRRORED = {"vocab_size": "vocab_size", "hidden_size": "d_model",
             "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings"}


class ModLMConfig(PreTrainedConfig):
    """A modlm model's configuration in transformers' form (see the module docstring)."""

    model_type = MODEL_TYPE

    modlm: dict | None = None
    retrofit: dict | None = None
    routing_mode: str = "router"
    vocab_size: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        cfg = ModelConfig() if self.modlm is None else ModelConfig.from_dict(self.modlm)
        self.modlm = cfg.to_dict()
        for hf_name, modlm_name in _MIRRORED.items():
            value, default = getattr(self, hf_name), getattr(type(self), hf_name)
            # The mirrored fields follow `modlm`; one passed with another value is a conflict.
            if value != default and value != getattr(cfg, modlm_name):
                raise ValueError(f"{hf_name}={value!r} contradicts modlm.{modlm_name}="
                                 f"{getattr(cfg, modlm_name)!r}; set it in the modlm config "
                                 f"(the Hugging Face fields mirror it)")
            setattr(self, hf_name, getattr(cfg, modlm_name))
        if self.retrofit is not None:
            retro = RetrofitConfig(**self.retrofit)
            if retro.hf_config is None:
                raise ValueError("retrofit must record hf_config (the patched model's Hugging "
                                 "Face config); build the config with from_modlm(model)")
            self.retrofit = dataclasses.asdict(dataclasses.replace(retro, source=None))
        if self.routing_mode not in GENERATION_MODES:
            raise ValueError(
                f"routing_mode must be one of {GENERATION_MODES} (the causal rules of paper Sec "
                f"3.5), got {self.routing_mode!r}"
                + ("; 'topk' is not causal (whether a token is routed depends on later tokens) "
                   "and cannot evaluate or generate token by token" if self.routing_mode == "topk"
                   else ""))
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The modlm `ModelConfig` this configuration carries."""
        return ModelConfig.from_dict(self.modlm)

    def build_model(self) -> MoDLM | Any:
        """An untrained model of this architecture: a `MoDLM`, or with `retrofit` the patched
        Hugging Face decoder it records (`modlm.hf.retrofit.RetrofitLM`)."""
        if self.retrofit is None:
            return MoDLM(self.model_config())
        from modlm.hf.retrofit import model_from_run_config
        return model_from_run_config(self.model_config(), self.retrofit)


def check_folder_fits(cls: type[ModLMForCausalLM], folder: str | os.PathLike[str]) -> None:
    """Refuse a saved model folder whose config.json does not describe the weights it holds (names
    and shapes from the safetensors headers; modlm.untrusted), before transformers builds
    anything: a folder from someone else cannot make the loader allocate what its files do not
    justify, nor fail with a RecursionError on a hostile config."""
    folder = Path(folder)
    config_dict = untrusted.read_json(folder / "config.json", "model config")
    if not isinstance(config_dict, dict):
        raise untrusted.UntrustedFileError(f"{folder / 'config.json'} is not a JSON object")
    config = cls.config_class.from_dict(config_dict)
    shapes = untrusted.folder_weights_shapes(folder)
    if not shapes:
        return   # no safetensors weights: transformers says what is missing
    layer_counts: list[Any] = [config.num_hidden_layers]
    if config.retrofit is not None:
        from modlm.hf.retrofit import declared_layers
        layer_counts += declared_layers(config.retrofit["hf_config"])
    untrusted.build_to_fit(lambda: cls(config), shapes, where=f"model folder {folder}",
                           layer_counts=layer_counts,
                           absent_ok=lambda model: model._tied_weights_keys or {})


@dataclass
class ModLMCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus modlm's loss parts and routing statistics.

    lm_loss: the next-token loss alone (`loss` adds the weighted auxiliary losses);
    router_aux_loss / predictor_loss: paper Sec 3.5's two auxiliary losses (None for a dense
    model); routing: one `modlm.block.LayerRouting` per routed block (full-sequence forward of an
    unpadded batch only; None otherwise).
    """

    lm_loss: Tensor | None = None
    router_aux_loss: Tensor | None = None
    predictor_loss: Tensor | None = None
    routing: tuple | None = None


class ModLMCache(Cache):
    """The generation state of a modlm model: `modlm.generate.DecodeState` behind transformers'
    `Cache` interface.

    Created empty (`generate` makes one sized for its request; passed back to continue, or made
    with `max_cache_len=None`, it grows up to max_seq_len tokens per row). The first forward
    prefills it with each row's real tokens; later forwards append. It cannot be cropped,
    reordered or repeated across beams.
    """

    def __init__(self, max_cache_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.max_cache_len = max_cache_len
        self.engine: Engine | None = None
        self.state: DecodeState | None = None
        self._seen = 0   # tokens fed, counted in transformers' padded frame

    # ---- what transformers asks of a cache ------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions consumed in the padded batch's frame (prompt length + fed tokens)."""
        return self._seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state.caches)

    @property
    def mode(self) -> str | None:
        """The causal routing rule the cache was filled with (None while empty)."""
        return None if self.engine is None else self.engine.mode

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_linear(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    def reset(self) -> None:
        self.engine, self.state, self._seen = None, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a modlm cache cannot be rolled back (assisted decoding "
                                      "and speculative sampling are not supported)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("a modlm cache cannot be reordered: beam search is not "
                                  "supported; use greedy decoding or sampling (num_beams=1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a modlm cache cannot be repeated across beams; repeat the "
                                  "prompts instead (num_return_sequences does this)")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("a modlm cache cannot select rows; start a new generation")

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a modlm cache is filled by modlm's generation engine, not by "
                                  "transformers attention layers")

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a modlm cache builds its own attention masks")

    # ---- filling it -----------------------------------------------------------------------------

    def prefill(self, model: MoDLM, mode: str, prompts: list[list[int]], padded_len: int,
                all_logits: bool) -> Tensor:
        """Route and cache each row's real tokens; the logits of each row's last token (B, V), or
        with all_logits of every real token, right-padded (B, longest prompt, V)."""
        if self.state is not None:
            raise GenerationError("this ModLMCache is already filled; pass a new one")
        engine = Engine(model, mode)   # refuses 'topk' and rules the model was not trained for
        L = engine.context          # max_seq_len, or a sliding-window model's window
        longest = max(map(len, prompts))
        max_tokens = L
        if self.max_cache_len is not None:
            # Tokens still to be fed after the prompt, the same for every row in the padded frame.
            later = max(self.max_cache_len - padded_len, 0)
            max_tokens = longest + later
            if max_tokens > L or longest >= L:
                raise GenerationError(
                    f"the longest prompt has {longest} real tokens; with {later + 1} new tokens "
                    f"it would exceed the model's context {engine.context_name} (room for "
                    f"{max(L - longest, 0)} new tokens); lower max_new_tokens or shorten it")
        self.state, logits = engine.prefill(prompts, max_tokens=max_tokens, all_logits=all_logits)
        self.engine = engine
        self._seen = padded_len
        return logits

    def feed(self, tokens_BN: Tensor) -> Tensor:
        """Feed N new tokens per row, one decode step each; their logits (B, N, V)."""
        if self.state is None or self.engine is None:
            raise GenerationError("the cache is empty: the first forward must hold the prompt")
        B = self.state.batch_size
        if tokens_BN.shape[0] != B:
            raise GenerationError(f"the cache holds {B} rows but {tokens_BN.shape[0]} were fed; "
                                  f"a cache serves the batch that filled it")
        need = int(self.state.pos_B.max()) + tokens_BN.shape[1]
        if need > self.state.max_tokens:
            # A cache passed back to generate to continue: let it grow (lazily, by doubling) up
            # to the context.
            L = self.engine.context
            if need > L:
                raise GenerationError(f"a row would hold {need} tokens, beyond the model's "
                                      f"context {self.engine.context_name}; lower "
                                      f"max_new_tokens")
            self.state.max_tokens = L
            for layer_cache in self.state.caches:
                layer_cache.limit = L
        logits = []
        for column_B in tokens_BN.unbind(1):
            logits.append(self.engine.decode_step(self.state, column_B))
            self._seen += 1
        return torch.stack(logits, dim=1)

    # ---- what it skipped ------------------------------------------------------------------------

    def block_entries(self) -> list[int]:
        """Per block, the tokens its cache holds, summed over rows (routed blocks hold fewer)."""
        return [] if self.state is None else self.state.cache_entries()

    def routed_blocks(self) -> tuple[int, ...]:
        return () if self.engine is None else tuple(self.engine.cfg.routed_layers)

    def routed_fraction(self) -> dict[int, float]:
        """Per routed block, tokens routed into it / tokens that reached it (prompt and decode;
        rows transformers keeps feeding padding after they finished count too)."""
        if self.state is None:
            return {}
        return {i: self.state.routed_tokens[i] / self.state.seen_tokens[i]
                for i in self.routed_blocks() if self.state.seen_tokens[i]}


class ModLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A modlm model (`self.model`, a `MoDLM`) as a transformers causal LM (module docstring)."""

    config_class = ModLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _is_stateful = True   # its cache cannot roll back: transformers refuses assisted decoding
    # modlm's attention is always torch's scaled_dot_product_attention, whatever
    # `attn_implementation` says; declaring it lets callers ask for "sdpa" without an error.
    _supports_sdpa = True

    def __init__(self, config: ModLMConfig, modlm_model: MoDLM | Any | None = None) -> None:
        super().__init__(config)
        cfg = config.model_config()
        if modlm_model is None:
            modlm_model = config.build_model()
        elif modlm_model.cfg != cfg:
            raise ValueError("modlm_model.cfg differs from config.modlm; build the config with "
                             "ModLMConfig(modlm=model.cfg.to_dict()) or use from_modlm(model)")
        self.model = modlm_model
        self._retrofit = config.retrofit is not None
        if self._retrofit:
            # The patched Hugging Face model ties (or not) as it always did, under `model.hf.`.
            inner = getattr(modlm_model.hf, "_tied_weights_keys", None) or {}
            self._tied_weights_keys = {f"model.hf.{k}": f"model.hf.{v}" for k, v in inner.items()}
        self.post_init()

    # ---- weights --------------------------------------------------------------------------------

    def _init_weights(self, module: torch.nn.Module) -> None:
        # MoDLM initialises its own parameters when built; loading replaces them all (strictly).
        # The rotary table is a non-persistent buffer: rebuild it whenever transformers asks.
        if isinstance(module, Rotary):
            cfg = self.config.model_config()
            with torch.device(module.cos_sin_TR2.device):
                fresh = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            with torch.no_grad():
                module.cos_sin_TR2.copy_(fresh.cos_sin_TR2)
        elif "RotaryEmbedding" in type(module).__name__:
            super()._init_weights(module)   # a retrofitted model's own (non-persistent) table

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `save_pretrained`, and the folder's `trust_remote_code` shim
        (modlm.hf.export): it loads in stock clients (lm-evaluation-harness) as these classes,
        and never carries a copy of modlm's code."""
        from modlm.hf.export import installed_classes_only, make_remote_loadable
        with installed_classes_only(ModLMConfig, ModLMForCausalLM):
            out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            make_remote_loadable(save_directory)
        return out

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, made strict: a missing, unexpected or mis-shaped
        weight raises instead of leaving a randomly initialised tensor. A local folder is checked
        first (`check_folder_fits`): its config must describe exactly the weights it holds before
        any memory is allocated."""
        wants_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        if args and os.path.isdir(args[0]):
            check_folder_fits(cls, args[0])
        model, info = super().from_pretrained(*args, **kwargs)
        bad = {k: sorted(map(str, v)) for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"the weights do not fit the modlm model its config describes: "
                             f"{bad}; was the folder written by ModLMForCausalLM.save_pretrained?")
        return (model, info) if wants_info else model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.hf.get_input_embeddings() if self._retrofit else self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.hf.get_output_embeddings() if self._retrofit else self.model.lm_head

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a modlm model's vocabulary is fixed by its ModelConfig; "
                                  "build a new model with another vocab_size")

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, cache: ModLMCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                routing_mode: str | None = None, return_dict: bool | None = None,
                past_key_values: ModLMCache | None = None,
                inputs_embeds: Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None) -> ModLMCausalLMOutput | tuple:
        """Logits for `input_ids` (B, T); see the module docstring for modes, padding, labels
        and the cache. logits_to_keep > 0 returns only the last that many positions."""
        if inputs_embeds is not None:
            raise ValueError("modlm models take input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("modlm models do not return attentions or hidden states")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids of shape (batch, time) are required")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
        cache = cache if cache is not None else past_key_values
        mask_BT = _check_mask(attention_mask, input_ids)
        if cache is None and use_cache:
            cache = ModLMCache()
        if cache is not None:
            if not isinstance(cache, ModLMCache):
                raise ValueError(f"modlm models need a ModLMCache, got {type(cache).__name__}; "
                                 f"let generate() create it or pass ModLMCache()")
            if labels is not None:
                raise ValueError("labels need the full-sequence forward; call without a cache")
            mode = routing_mode or self.config.routing_mode
            out = ModLMCausalLMOutput(
                logits=self._forward_cached(input_ids, mask_BT, cache, mode, logits_to_keep),
                cache=cache)
        else:
            # Deviation: transformers tooling switches train() / eval(); training uses the
            # paper's top-k forward, evaluation the causal rule (docs/design.md).
            mode = routing_mode or ("topk" if self.training else self.config.routing_mode)
            out = self._forward_full(input_ids, mask_BT, labels, mode, logits_to_keep)
        return out if return_dict is not False else out.to_tuple()

    def _forward_cached(self, ids_BT: Tensor, mask_BT: Tensor | None, cache: ModLMCache,
                        mode: str, logits_to_keep: int) -> Tensor:
        if cache.state is None:
            if mask_BT is not None and mask_BT.shape != ids_BT.shape:
                raise GenerationError(f"the prompt's attention_mask {tuple(mask_BT.shape)} must "
                                      f"match its input_ids {tuple(ids_BT.shape)}")
            prompts = _real_rows(ids_BT, mask_BT)
            keep_last = logits_to_keep == 1
            logits = cache.prefill(self.model, mode, prompts, ids_BT.shape[1],
                                   all_logits=not keep_last)
            if keep_last:
                return logits[:, None]
            return _keep(_to_padded(logits, mask_BT, ids_BT.shape), logits_to_keep)
        if cache.mode != mode:
            raise GenerationError(f"the cache was filled in routing mode {cache.mode!r}, not "
                                  f"{mode!r}")
        N = ids_BT.shape[1]
        if mask_BT is not None and not bool(mask_BT[:, -N:].all()):
            raise GenerationError("padding among the new tokens of a cached forward: only the "
                                  "prompt (the first forward) may hold padding")
        return _keep(cache.feed(ids_BT), logits_to_keep)

    def _forward_full(self, ids_BT: Tensor, mask_BT: Tensor | None, labels_BT: Tensor | None,
                      mode: str, logits_to_keep: int) -> ModLMCausalLMOutput:
        if mask_BT is not None and mask_BT.shape != ids_BT.shape:
            raise ValueError(f"attention_mask shape {tuple(mask_BT.shape)} must equal input_ids' "
                             f"{tuple(ids_BT.shape)}")
        if labels_BT is not None and labels_BT.shape != ids_BT.shape:
            raise ValueError(f"labels shape {tuple(labels_BT.shape)} must equal input_ids' "
                             f"{tuple(ids_BT.shape)}")
        if mask_BT is None or bool(mask_BT.all()) or self._retrofit:
            # A retrofitted model takes the padding mask itself (positions count real tokens,
            # padding is never routed, top-k over each row's real tokens).
            extra = {"attention_mask_BT": mask_BT} if self._retrofit else {}
            out = self.model(ids_BT, _targets(labels_BT), mode=mode, **extra)
            return ModLMCausalLMOutput(
                loss=out.loss, logits=_keep(out.logits_BTV, logits_to_keep), lm_loss=out.lm_loss,
                router_aux_loss=out.router_aux_loss, predictor_loss=out.predictor_loss,
                routing=out.routing)
        # Padding: each row alone on its real tokens, as an unpadded run of that row.
        B, T = ids_BT.shape
        logits_BTV = None
        parts: dict[str, list[tuple[Tensor, int]]] = {}
        for b in range(B):
            real = mask_BT[b]
            if not bool(real.any()):
                raise ValueError(f"row {b} has no token with attention_mask 1")
            ids = ids_BT[b, real][None]
            out = self.model(ids, None if labels_BT is None else _targets(labels_BT[b, real][None]),
                             mode=mode)
            if logits_BTV is None:
                logits_BTV = out.logits_BTV.new_zeros(B, T, out.logits_BTV.shape[-1])
            logits_BTV[b, real] = out.logits_BTV[0]
            n = 0 if labels_BT is None else int((_targets(labels_BT[b, real][None]) != -1).sum())
            if n > 0:   # a row with no counted target has no loss (its mean would be nan)
                for name in ("loss", "lm_loss", "router_aux_loss", "predictor_loss"):
                    value = getattr(out, name)
                    if value is not None:
                        parts.setdefault(name, []).append((value, n))
        # Losses over the batch: each row's means weighted by its counted targets.
        losses = {name: sum(v * n for v, n in items) / max(sum(n for _, n in items), 1)
                  for name, items in parts.items()}
        return ModLMCausalLMOutput(logits=_keep(logits_BTV, logits_to_keep), **losses)

    # ---- generation -----------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids: Tensor,
                                      next_sequence_length: int | None = None,
                                      cache: ModLMCache | None = None,
                                      attention_mask: Tensor | None = None,
                                      inputs_embeds: Tensor | None = None,
                                      is_first_iteration: bool | None = False,
                                      **kwargs: Any) -> dict[str, Any]:
        """The forward's inputs for one generation step: the whole prompt first, then only the
        new tokens; always in the config's causal routing mode unless routing_mode is given."""
        if inputs_embeds is not None:
            raise ValueError("modlm models generate from input_ids, not inputs_embeds")
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        # transformers keeps its own bookkeeping wherever the caller's tensors are; the model
        # reads them on its device.
        input_ids = input_ids.to(self.device, copy=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                  "routing_mode": kwargs.get("routing_mode") or self.config.routing_mode}
        for name in ("use_cache", "logits_to_keep"):
            if kwargs.get(name) is not None:
                inputs[name] = kwargs[name]
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                inputs[name] = kwargs[name]   # the forward explains the refusal
        return inputs

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict,
                                      generation_mode: Any, batch_size: int,
                                      max_cache_length: int) -> None:
        cache = model_kwargs.get("cache")
        if cache is not None:
            if not isinstance(cache, ModLMCache):
                raise ValueError(f"modlm models generate with a ModLMCache, got "
                                 f"{type(cache).__name__}; pass none and generate makes one")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} "
                             f"is not available: modlm models use their own routed KV cache")
        model_kwargs["cache"] = ModLMCache(max_cache_len=max_cache_length)

    def _validate_generation_mode(self, generation_mode: Any, generation_config: Any,
                                  generation_mode_kwargs: dict) -> None:
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            name = str(getattr(generation_mode, "value", generation_mode)).replace("_", " ")
            raise ValueError(
                f"modlm models generate by greedy decoding or sampling only (num_beams=1, no "
                f"assistant model, no contrastive or DoLa decoding); got {name}. Beam "
                f"search and assisted decoding would reorder or roll back the routed KV cache, "
                f"whose rows hold different numbers of routed tokens")
        super()._validate_generation_mode(generation_mode, generation_config,
                                          generation_mode_kwargs)


def default_routing_mode(cfg: ModelConfig) -> str:
    """The causal rule a model was trained for: "router" if it has the auxiliary loss, else
    "predictor" if it has a predictor (dense models: "router", which they ignore)."""
    r = cfg.routing
    if cfg.is_dense or (r.router in ("learned", "threshold") and r.aux_loss_weight > 0):
        return "router"
    if r.predictor and r.predictor_loss_weight > 0:
        return "predictor"
    return "router"   # neither was trained: generation will refuse, with the reason


def from_modlm(model: MoDLM | Any, routing_mode: str | None = None, **config_fields: Any
               ) -> ModLMForCausalLM:
    """Wrap a `MoDLM` or a retrofitted Hugging Face model (`modlm.hf.retrofit.RetrofitLM`),
    sharing its parameters, as a `ModLMForCausalLM`. routing_mode: the causal rule for evaluation
    and generation (default: `default_routing_mode`); other keyword arguments are `ModLMConfig`
    fields (e.g. pad_token_id=0)."""
    retrofit = None
    if not isinstance(model, MoDLM):
        from modlm.hf.retrofit import RetrofitLM
        if not isinstance(model, RetrofitLM):
            raise TypeError(f"from_modlm wraps a MoDLM or a RetrofitLM, got "
                            f"{type(model).__name__}")
        retrofit = model.run_config().to_dict()
    config = ModLMConfig(modlm=model.cfg.to_dict(), retrofit=retrofit,
                         routing_mode=routing_mode or default_routing_mode(model.cfg),
                         **config_fields)
    wrapper = ModLMForCausalLM(config, modlm_model=model)
    return wrapper.train(model.training)


# ---- helpers -----------------------------------------------------------------------------------


def _check_mask(mask: Tensor | None, ids_BT: Tensor) -> Tensor | None:
    """A 2-D 0/1 padding mask as booleans. It may be longer than input_ids (a cached forward's
    mask covers the past too); its last T columns belong to input_ids."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] != ids_BT.shape[0] or mask.shape[1] < ids_BT.shape[1]:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit input_ids of "
                         f"shape {tuple(ids_BT.shape)}: give a 2-D padding mask (batch, time)")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return mask.bool().to(ids_BT.device)


def _real_rows(ids_BT: Tensor, mask_BT: Tensor | None) -> list[list[int]]:
    """Each row's real tokens (attention_mask 1), in order: padding anywhere is dropped."""
    if mask_BT is None:
        return ids_BT.tolist()
    rows = [ids_BT[b, mask_BT[b]].tolist() for b in range(ids_BT.shape[0])]
    empty = [b for b, r in enumerate(rows) if not r]
    if empty:
        raise GenerationError(f"rows {empty} have no token with attention_mask 1; every row "
                              f"needs at least one real token")
    return rows


def _to_padded(logits_BKV: Tensor, mask_BT: Tensor | None, shape: torch.Size) -> Tensor:
    """Right-padded per-row logits (B, K, V) back into the padded batch's layout (B, T, V);
    padding positions get zeros."""
    if mask_BT is None:
        return logits_BKV
    B, K, V = logits_BKV.shape
    n_B = mask_BT.sum(dim=1)
    valid_BK = torch.arange(K, device=n_B.device) < n_B[:, None]
    out_BTV = logits_BKV.new_zeros(shape[0], shape[1], V)
    out_BTV[mask_BT] = logits_BKV[valid_BK]
    return out_BTV


def _keep(logits_BTV: Tensor, logits_to_keep: int) -> Tensor:
    return logits_BTV[:, -logits_to_keep:] if logits_to_keep > 0 else logits_BTV


def _targets(labels_BT: Tensor | None) -> Tensor | None:
    """transformers labels (the model shifts, -100 ignored) -> modlm targets (shifted, -1)."""
    if labels_BT is None:
        return None
    shifted = torch.cat((labels_BT[:, 1:], labels_BT.new_full((labels_BT.shape[0], 1), _IGNORE)),
                        dim=1)
    return shifted.masked_fill(shifted == _IGNORE, -1)


__all__ = ["ModLMConfig", "ModLMForCausalLM", "ModLMCache", "ModLMCausalLMOutput", "from_modlm",
           "default_routing_mode"]
