"""Every packaged run config loads for every preset of its model (by name and by path) and yields a
valid model config; every language model has a run config."""

import os

import pytest
from conftest import ROOT

from zoo.config import load_config, packaged_configs
from zoo.models import registry


@pytest.mark.parametrize("name", packaged_configs())
def test_config_loads_for_every_preset(name):
    assert load_config(f"{name}:tiny").model_name == name
    for preset in registry.list_presets(name):
        config = load_config(f"{name}:{preset}")
        assert config.preset == preset and config.data.seq_len > 0 and config.train.steps > 0
        registry.config_from_run(config)  # the model dataclass validates its fields
    by_path = load_config(os.path.join(ROOT, "configs", f"{name}.py") + ":tiny")
    assert by_path.to_dict() == load_config(f"{name}:tiny").to_dict()


def test_every_language_model_has_a_run_config():
    assert set(registry.list_models("lm")) == set(packaged_configs())


def test_run_settings_for_unknown_presets_are_refused():
    from zoo.config import make_config

    with pytest.raises(ValueError, match="unknown preset"):
        make_config("transformer", "tiny", runs={"huge": {"train": {"steps": 1}}})
    with pytest.raises(ValueError, match="unknown config key"):
        make_config("transformer", "tiny", runs={"tiny": {"train": {"stepz": 1}}})


def test_paper_presets_scan_with_remat_and_flops_count_every_layer():
    """Pod presets train scanned with full remat; zoo info's FLOPs count every layer of a scanned
    stack (XLA's cost analysis counts a loop body once) and equal the looped model's."""
    from zoo.info import forward_flops_per_token

    config = load_config("mamba2:130m", ["--config.model.n_layers=4"])
    assert config.model.scan_layers and config.model.remat == "full"
    looped = load_config("mamba2:130m", ["--config.model.n_layers=4", "--config.model.scan_layers=False"])
    one_layer = load_config("mamba2:130m", ["--config.model.n_layers=1", "--config.model.scan_layers=False"])
    assert (
        forward_flops_per_token(config, 64)
        == forward_flops_per_token(looped, 64)
        > forward_flops_per_token(one_layer, 64)
    )
