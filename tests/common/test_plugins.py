"""Plugins: user modules imported by name (config, ``--plugin``) or as installed entry points."""

from __future__ import annotations

import json
import re
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedpipe.cli import main
from fedpipe.common import plugins, registry
from fedpipe.common.config import (
    ClientConfig,
    ConfigError,
    ServerConfig,
    SimulationConfig,
    load_config,
)
from fedpipe.common.plugins import PluginError, import_plugins
from fedpipe.common.vector import Vector
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun
from tests.plugin_packages import write_dist_info, write_module

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()

DOUBLE = """\
from typing import ClassVar

from fedpipe.common.modules import OptiModule
from fedpipe.common.vector import Vector


class Double(OptiModule):
    name: ClassVar[str] = "{name}"

    def run(self, gradients: Vector) -> Vector:
        return gradients * 2
"""


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A folder on ``sys.path`` for fake packages; the registry, the entry-point state and
    ``sys.modules`` are as before once the test is over."""
    monkeypatch.setattr(registry, "_REGISTRY", {f: dict(t) for f, t in registry._REGISTRY.items()})
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("fake"):
            del sys.modules[name]


def test_entry_point_is_imported_at_the_first_unknown_name_only(isolated: Path) -> None:
    write_module(isolated, "fakeext.double", DOUBLE.format(name="fake-double"))
    write_dist_info(isolated, "fakeext", "0.1", {"double": "fakeext.double"})
    registry.get_class("module", "adam")
    assert "fakeext.double" not in sys.modules  # a run of built-ins imports no plugin
    module = registry.build("module", "fake-double")
    assert "fakeext.double" in sys.modules
    out = module.run(Vector({"w": np.array([1.0, -3.0])}))
    assert np.array_equal(out["w"], [2.0, -6.0])
    assert "fake-double" in registry.names("module")


def test_registry_names_include_installed_plugins(isolated: Path) -> None:
    write_module(isolated, "fakelist.double", DOUBLE.format(name="fake-listed"))
    write_dist_info(isolated, "fakelist", "2.0", {"listed": "fakelist.double"})
    assert "fake-listed" in registry.names("module")


def test_an_entry_point_that_looks_names_up_while_imported_does_not_deadlock(
    isolated: Path,
) -> None:
    source = "from fedpipe.common import registry\nregistry.names('module')\n"
    write_module(isolated, "fakereent.ext", source + DOUBLE.format(name="fake-reent"))
    write_dist_info(isolated, "fakereent", "0.1", {"ext": "fakereent.ext"})
    found: list[type] = []
    lookup = threading.Thread(
        target=lambda: found.append(registry.get_class("module", "fake-reent")), daemon=True
    )
    lookup.start()
    lookup.join(timeout=30)
    assert not lookup.is_alive(), "the lookup waits for itself"
    assert [cls.__module__ for cls in found] == ["fakereent.ext"]


@pytest.mark.parametrize(
    "source, cause",
    [
        (None, "ModuleNotFoundError: No module named 'fakebroken'"),
        ("raise RuntimeError('needs a licence server')", "RuntimeError: needs a licence server"),
    ],
)
def test_broken_entry_point_names_its_distribution_and_entry_point(
    isolated: Path, source: str | None, cause: str
) -> None:
    if source is not None:
        write_module(isolated, "fakebroken.gone", source)
    write_dist_info(isolated, "fakebroken", "1.2", {"ext": "fakebroken.gone"})
    registry.get_class("module", "adam")  # a built-in name does not need the plugins
    with pytest.raises(PluginError) as err:
        registry.get_class("module", "anything-not-built-in")
    message = str(err.value)
    assert "entry point 'ext' = 'fakebroken.gone'" in message
    assert "group 'fedpipe.plugins'" in message
    assert "distribution 'fakebroken' 1.2" in message
    assert cause in message
    with pytest.raises(PluginError, match="fakebroken"):  # said again, not forgotten
        registry.names("module")


def test_unknown_name_says_how_to_load_a_plugin() -> None:
    with pytest.raises(registry.UnknownNameError) as err:
        registry.build("module", "not-a-module")
    message = str(err.value)
    assert message.startswith("unknown module 'not-a-module'; known module names: ")
    assert "--plugin mypkg.fedext" in message
    assert 'plugins = ["mypkg.fedext"]' in message
    assert "'fedpipe.plugins' group of an installed package" in message


def test_import_plugins_registers_the_classes_of_a_module(isolated: Path) -> None:
    write_module(isolated, "fakeown.double", DOUBLE.format(name="fake-own"))
    import_plugins(["fakeown.double"])
    assert registry.get_class("module", "fake-own").__module__ == "fakeown.double"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "fakemissing.ext",
            None,
            "plugin module 'fakemissing.ext' not found (No module named 'fakemissing'): "
            "install its package",
        ),
        (
            "fakedep.ext",
            "import fake_dependency_not_installed",
            "plugin module 'fakedep.ext' failed while being imported: ModuleNotFoundError: "
            "No module named 'fake_dependency_not_installed'",
        ),
        (
            "fakebug.ext",
            "1 / 0",
            "plugin module 'fakebug.ext' failed while being imported: ZeroDivisionError",
        ),
        (
            "fakedup.ext",
            DOUBLE.format(name="adam"),
            "module name 'adam' is taken by fedpipe.common.modules.adaptive.AdamModule",
        ),
    ],
)
def test_a_plugin_that_cannot_be_imported_says_which_and_why(
    isolated: Path, module: str, source: str | None, expected: str
) -> None:
    if source is not None:
        write_module(isolated, module, source)
    with pytest.raises(PluginError, match=re.escape(expected)):
        import_plugins([module])


@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig, SimulationConfig])
def test_config_plugins_must_be_module_names(tmp_path: Path, cls: type) -> None:
    path = tmp_path / "config.toml"
    extra = 'dataset = "digits"\n' if cls is ClientConfig else ""
    path.write_text(extra + 'plugins = ["mypkg.fedext", "mypkg/fedext.py"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(cls, path)
    assert "plugins.1: Value error, 'mypkg/fedext.py' is not a module name" in str(err.value)
    path.write_text(extra + 'plugins = ["mypkg.fedext", "_x.y2"]\n')
    assert load_config(cls, path).plugins == ["mypkg.fedext", "_x.y2"]


@pytest.mark.parametrize(
    "argv",
    [["server", "--rounds", "1"], ["client", "--dataset", "digits"], ["simulate", "--rounds", "1"]],
)
def test_every_command_loads_its_plugins_first_and_fails_clearly(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main([*argv, "--plugin", "fakeplugin_not_installed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedpipe {argv[0]}: plugin module 'fakeplugin_not_installed' not found")


@pytest.mark.parametrize("how", ["flag", "config"])
def test_simulate_uses_a_plugin_module_by_name(
    isolated: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    write_module(isolated, "fakesim.double", DOUBLE.format(name="fake-sim-double"))
    config = isolated / "sim.toml"
    plugins_line = 'plugins = ["fakesim.double"]\n' if how == "config" else ""
    config.write_text(
        f"{plugins_line}n_clients = 2\n[server]\nrounds = 1\nmin_clients = 2\n"
        f'output_dir = "{isolated / "run"}"\n'
        '[server.client_optimizer]\nlrate = 0.1\nmodules = ["fake-sim-double"]\n'
    )
    flags = ["--plugin", "fakesim.double"] if how == "flag" else []
    assert main(["simulate", "--config", str(config), *flags]) == 0, capsys.readouterr().err
    assert json.loads((isolated / "run" / "summary.json").read_text())["rounds_completed"] == 1


def test_the_run_setup_sent_to_clients_carries_no_plugins(tmp_path: Path) -> None:
    model = {"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}}
    config = ServerConfig.model_validate(
        {"plugins": ["json"], "output_dir": tmp_path, "model": model}
    )
    setup = FederatedRun(config, ClientPool()).setup.to_data()
    assert "plugins" not in setup
    assert '"json"' not in json.dumps(setup)


def test_readme_entry_point_snippet_declares_a_plugin_module() -> None:
    (snippet,) = [
        b for b in re.findall(r"```toml\n(.*?)```", README, flags=re.S) if "entry-points" in b
    ]
    group = tomllib.loads(snippet)["project"]["entry-points"][plugins.ENTRY_POINT_GROUP]
    assert group == {"fedext": "mypkg.fedext"}
    assert "--plugin mypkg.fedext" in README
