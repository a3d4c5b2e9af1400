"""The README's model table is generated from the registry and the cards, and is current."""

import pathlib

import pytest
from conftest import ROOT

from zoo import info
from zoo.models import registry


def test_readme_model_table_is_current():
    readme = pathlib.Path(ROOT, "README.md").read_text()
    assert info.readme_with_model_table(readme, pathlib.Path(ROOT)) == readme, (
        "the README's model table is stale: run `python -m zoo.info --write-readme`"
    )


def test_every_model_has_a_card_and_declares_its_row():
    for name in registry.list_models():
        cls = registry.model_class(name)
        assert info.model_card(name, pathlib.Path(ROOT)).is_file()
        assert cls.paper and cls.numerical_core, name


def test_a_model_without_a_card_is_a_value_error(tmp_path):
    (tmp_path / "docs" / "models").mkdir(parents=True)
    with pytest.raises(ValueError, match="no model card in docs/models/ says .registered as `hip`."):
        info.model_table(tmp_path)


def test_models_are_listed_by_what_they_declare():
    assert registry.list_models(convertible_from="mamba2") == ["mamba2", "memmamba"]
    assert "transformer" in registry.list_models(attention="dispatch")
    assert "mamba2" not in registry.list_models(attention="dispatch")
    with pytest.raises(ValueError, match="unknown declaration"):
        registry.list_models(colour="blue")
