"""Configuration (modlm/config.py): validation messages, JSON round trip, dotted overrides."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from modlm.config import ConfigError, ModelConfig, RoutingConfig, apply_overrides

# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(routing=dict(capacity=0.0)), r"routing\.capacity must be in \(0, 1\], got 0\.0"),
    (dict(routing=dict(capacity=1.5)), r"routing\.capacity must be in \(0, 1\], got 1\.5"),
    (dict(d_model=32, n_heads=3), r"d_model \(32\) must be divisible by n_heads \(3\)"),
    (dict(d_model=30, n_heads=2), r"head dimension .* = 15 must be even"),
    (dict(routing=dict(router="expert")), r"routing\.router must be one of .*'expert'"),
    (dict(routing=dict(router_weight="softmax")), r"routing\.router_weight .*'softmax'"),
    (dict(routing=dict(layers="odd")), r"routing\.layers must be one of .*'odd'"),
    (dict(routing=dict(layers=(1, 4))), r"block indices \[4\] outside 0\.\.3"),
    (dict(routing=dict(layers=(-1, 1))), r"block indices \[-1\] outside 0\.\.3"),
    (dict(routing=dict(layers=(1, 1))), r"lists a block twice"),
    (dict(routing=dict(layers=(0, 2))), r"includes block 0 .*first_layer_dense"),
    (dict(routing=dict(router="random")), r"router='random'.*predictor=false"),
    (dict(routing=dict(router="random", predictor=False)), r"aux_loss_weight=0"),
    (dict(routing=dict(aux_loss_weight=-0.1)), r"aux_loss_weight must be >= 0"),
    (dict(n_layers=0), r"n_layers must be a positive integer, got 0"),
    (dict(vocab_size=True), r"vocab_size must be a positive integer, got True"),
    (dict(mlp="relu"), r"mlp must be one of .*'relu'"),
    (dict(d_mlp=0), r"d_mlp must be a positive integer or null, got 0"),
])
def test_validation_errors(make_cfg, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(**kwargs)


def test_valid_neighbours_of_the_errors_pass(make_cfg):
    """The boundaries themselves are accepted: the checks are not simply always failing."""
    assert make_cfg(routing=dict(capacity=1.0)).routing.capacity == 1.0
    assert make_cfg(d_model=48, n_heads=3).head_dim == 16
    assert make_cfg(routing=dict(layers=(0, 2), first_layer_dense=False)).routed_layers == (0, 2)
    assert make_cfg(routing=dict(layers=(3,))).routed_layers == (3,)
    random = make_cfg(routing=dict(router="random", predictor=False, aux_loss_weight=0.0))
    assert random.routed_layers == (1, 3)


def test_predictor_hidden_must_be_an_integer():
    # A fractional width passes validation today and only fails deep inside nn.Linear.
    with pytest.raises(ConfigError, match="predictor_hidden"):
        RoutingConfig(predictor_hidden=2.5)
    with pytest.raises(ConfigError, match="predictor_hidden"):
        RoutingConfig(predictor_hidden=0)


def test_config_is_frozen(make_cfg):
    cfg = make_cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64  # type: ignore[misc]


# ---- derived values --------------------------------------------------------------------------

def test_routed_layers_property(make_cfg):
    assert make_cfg(n_layers=6).routed_layers == (1, 3, 5)
    assert make_cfg(n_layers=7, routing=dict(layers="all")).routed_layers == (1, 2, 3, 4, 5, 6)
    assert make_cfg(routing=dict(layers=(3, 1))).routed_layers == (1, 3)
    assert make_cfg(routing=dict(layers="none")).routed_layers == ()
    assert make_cfg(routing=dict(router="none")).routed_layers == ()
    assert make_cfg(n_layers=1).is_dense and not make_cfg(n_layers=2).is_dense


def test_derived_widths(make_cfg):
    cfg = make_cfg(d_model=48, n_heads=3, d_mlp=None)
    assert cfg.mlp_hidden == 128                       # 8/3 * 48 = 128, a multiple of 32
    assert make_cfg(d_model=32, d_mlp=None).mlp_hidden == 96   # 85.3 -> 96
    assert make_cfg(mlp="gelu", d_mlp=None).mlp_hidden == 128
    assert make_cfg().mlp_hidden == 37
    assert make_cfg(d_model=48, n_heads=3).predictor_hidden == 6
    assert make_cfg(routing=dict(predictor_hidden=5)).predictor_hidden == 5


# ---- serialisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(routing=dict(layers=(1, 3), capacity=0.25, router_weight="raw", predictor_hidden=7)),
    dict(mlp="gelu", tie_embeddings=False, routing=dict(router="none")),
    dict(routing=dict(router="random", predictor=False, aux_loss_weight=0.0, layers="all")),
])
def test_json_round_trip(make_cfg, kwargs):
    cfg = make_cfg(**kwargs)
    text = cfg.to_json()
    back = ModelConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_json() == text
    assert isinstance(back.routing, RoutingConfig)
    if isinstance(cfg.routing.layers, tuple):
        assert back.routing.layers == (1, 3) and isinstance(back.routing.layers, tuple)
        assert json.loads(text)["routing"]["layers"] == [1, 3]
    assert hash(back) == hash(cfg)


def test_from_dict_rejects_unknown_keys(make_cfg):
    d = make_cfg().to_dict()
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['dmodel'\]"):
        ModelConfig.from_dict({**d, "dmodel": 32})
    bad_routing = {**d, "routing": {**d["routing"], "capacty": 0.5}}
    with pytest.raises(ConfigError, match=r"\['routing\.capacty'\]"):
        ModelConfig.from_dict(bad_routing)


# ---- overrides -------------------------------------------------------------------------------

def test_apply_overrides_cli_strings(make_cfg):
    cfg = make_cfg(n_layers=6)
    new = apply_overrides(cfg, {
        "routing.capacity": "0.25",
        "routing.predictor": "false",
        "routing.layers": "[1, 3]",
        "mlp": "gelu",
        "n_layers": "5",
        "routing.aux_loss_weight": "0",
    })
    assert new.routing.capacity == 0.25 and isinstance(new.routing.capacity, float)
    assert new.routing.predictor is False
    assert new.routing.layers == (1, 3) and new.routed_layers == (1, 3)
    assert new.mlp == "gelu" and new.n_layers == 5
    assert new.routing.aux_loss_weight == 0.0 and isinstance(new.routing.aux_loss_weight, float)
    # Untouched fields survive, the original is unchanged.
    assert new.d_model == cfg.d_model and new.routing.router_weight == "sigmoid"
    assert cfg.routing.capacity == 0.125 and cfg.routed_layers == (1, 3, 5) and cfg.mlp == "swiglu"
    again = apply_overrides(new, {"routing.predictor": "true", "routing.layers": "all"})
    assert again.routing.predictor is True and again.routed_layers == (1, 2, 3, 4)


def test_apply_overrides_python_values(make_cfg):
    new = apply_overrides(make_cfg(), {"routing.router_weight": "raw", "routing.capacity": 1,
                                       "tie_embeddings": False, "routing.layers": [2]})
    assert new.routing.router_weight == "raw" and new.routing.capacity == 1.0
    assert new.tie_embeddings is False and new.routed_layers == (2,)


@pytest.mark.parametrize("key, value, expected", [
    ("n_layers", "4.0", 4),
    ("d_mlp", "40.0", 40),
    ("routing.predictor_hidden", "8.0", 8),
])
def test_apply_overrides_coerces_integral_floats(make_cfg, key, value, expected):
    """'4.0' for an integer field means 4, for plain and optional (int | None) fields alike."""
    new = apply_overrides(make_cfg(), {key: value})
    head, _, rest = key.partition(".")
    got = getattr(new.routing, rest) if rest else getattr(new, head)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("overrides, error, match", [
    ({"routing.bogus": "1"}, ConfigError, "bogus"),
    ({"bogus": "1"}, ConfigError, r"unknown config key 'bogus'"),
    ({"routing": "1"}, ConfigError, "is a group"),
    ({"d_model.x": "1"}, ConfigError, "has no sub-keys"),
    ({"n_layers": "many"}, ConfigError, "n_layers"),
    ({"n_layers": "2.5"}, ConfigError, "n_layers must be an integer"),
    ({"routing.capacity": "1.5"}, ConfigError, r"capacity must be in \(0, 1\]"),
    ({"routing.layers": "[0, 9]"}, ConfigError, "outside"),
])
def test_apply_overrides_errors(make_cfg, overrides, error, match):
    with pytest.raises(error, match=match):
        apply_overrides(make_cfg(), overrides)


# ---- one home, no torch --------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "tokenizers", "matplotlib", "tensorboard")


def test_every_config_is_built_and_checked_without_torch_or_optional_packages():
    """modlm.config holds every config (model, data, retrofit, training) and the training presets
    build on it alone: a planner or record reader can make and validate a full TrainConfig
    without loading torch or any optional package. The last line shows the check can fail."""
    script = f"""
import sys
import modlm.config as c
from modlm.presets import configure
assert not [m for m in sys.modules if m.split(".")[0] in {HEAVY!r}], "import"
cfg = configure("tiny", {{"tokens": 10_000, "data.tokenizer": "bpe", "retrofit.train": "routing"}})
assert c.TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.steps is None
c.RetrofitConfig(source="folder", pretrained_lr=1e-5)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not loaded, loaded
import modlm.train
assert "torch" in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_configs_are_still_importable_where_they_were():
    from modlm import config, presets
    from modlm.data import DataConfig
    from modlm.hf.retrofit import RetrofitConfig
    from modlm.train import TrainConfig, configure, train_preset

    assert (TrainConfig, DataConfig, RetrofitConfig) == (
        config.TrainConfig, config.DataConfig, config.RetrofitConfig)
    assert (configure, train_preset) == (presets.configure, presets.train_preset)
