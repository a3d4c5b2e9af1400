"""Every run config in configs/ loads for every preset of its model and yields a valid model config."""
import glob
import os

import pytest

from conftest import ROOT
from zoo.config import load_config, model_config
from zoo.models import registry

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_for_every_preset(path):
    name = load_config(f"{path}:tiny").model_name
    assert os.path.basename(path) == f"{name}.py"
    for preset in registry.list_presets(name):
        config = load_config(f"{path}:{preset}")
        assert config.preset == preset and config.data.seq_len > 0 and config.train.steps > 0
        model_config(config)  # the model dataclass validates its fields
