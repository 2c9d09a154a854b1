"""The registry: names per family, errors that help, building from config entries."""

from __future__ import annotations

from typing import ClassVar

import pytest

from fedpipe.common import registry
from fedpipe.common.modules import OptiModule
from fedpipe.common.vector import Vector


def test_every_family_has_its_builtins() -> None:
    assert {"adam", "momentum", "scaffold-client"} <= set(registry.names("module"))
    assert set(registry.names("aggregator")) >= {"averaging", "gradient-masked-averaging", "sum"}
    assert {"fedprox", "lasso", "ridge"} <= set(registry.names("regularizer"))
    assert {"softmax-regression", "mlp"} <= set(registry.names("model"))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(registry.UnknownNameError) as err:
        registry.build("module", "adamw-typo")
    message = str(err.value)
    assert "unknown module 'adamw-typo'" in message
    assert "adam" in message and "momentum" in message


def test_bad_config_names_the_class_and_argument() -> None:
    with pytest.raises(TypeError, match=r"invalid config for module 'adam'.*'beta_3'"):
        registry.build("module", "adam", {"beta_3": 0.5})


def test_build_spec_accepts_instances_names_and_pairs() -> None:
    adam = registry.build("module", "adam", {"beta_1": 0.8})
    assert registry.build_spec("module", adam) is adam
    assert registry.build_spec("module", "adam").get_config()["beta_1"] == 0.9
    assert (
        registry.build_spec("module", ["adam", {"beta_1": 0.8}]).get_config() == adam.get_config()
    )
    assert registry.spec_of(adam) == ["adam", adam.get_config()]
    with pytest.raises(TypeError, match="expected an instance, a name, or a \\[name, config\\]"):
        registry.build_spec("module", 42)


def test_a_new_subclass_registers_itself_and_duplicates_are_refused() -> None:
    class Double(OptiModule):
        name: ClassVar[str] = "test-double"

        def run(self, gradients: Vector) -> Vector:
            return gradients * 2

    assert registry.get_class("module", "test-double") is Double
    with pytest.raises(registry.DuplicateNameError, match="'adam' is taken by"):

        class Impostor(OptiModule):
            name: ClassVar[str] = "adam"

            def run(self, gradients: Vector) -> Vector:
                return gradients
