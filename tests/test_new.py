"""``fedpipe new``: the project it writes runs as its README says, from its own folder.

The project is written once by a real ``fedpipe new demo_proj --dir ...`` process; each test
then runs it as a user would: its simulation from the project folder, its own tests with
pytest, a server and two clients from its server/client configs, and the installed route
(its ``fedpipe.plugins`` entry point, with no ``plugins`` in the config).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import fedpipe
from fedpipe.cli import main
from fedpipe.common.config import ClientConfig, ServerConfig, SimulationConfig, load_config
from fedpipe.server.simulation import free_port
from tests.plugin_packages import write_dist_info

NAME = "demo_proj"
MODULE = "demo-proj-signum"
#: The folder that holds the fedpipe under test: the processes import it, not another copy.
FEDPIPE_ROOT = Path(fedpipe.__file__).resolve().parent.parent
FILES = {
    ".gitignore",
    "README.md",
    "pyproject.toml",
    "simulation.toml",
    "server.toml",
    "client.toml",
    f"{NAME}/__init__.py",
    f"{NAME}/models.py",
    f"{NAME}/modules.py",
    f"tests/test_{NAME}.py",
}
ACCURACY_FLOOR = 0.85  # the template's run reaches about 0.94; learning nothing gives 0.1
TIMEOUT = 120.0


def python_env(*paths: Path) -> dict[str, str]:
    """The environment with ``paths`` (then fedpipe's folder) as PYTHONPATH."""
    path = os.pathsep.join(map(str, [*paths, FEDPIPE_ROOT]))
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)


def run(args: list[str], cwd: Path, *paths: Path) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` in ``cwd``, ``paths`` on the path (see :func:`python_env`)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=python_env(*paths),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def spawn(args: list[str], cwd: Path, *paths: Path) -> subprocess.Popen[str]:
    """``python -m <args>`` started in ``cwd``, its stderr in its stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=python_env(*paths),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, set[str]]:
    """The project folder, ``fedpipe new``'s stdout and the files it held right after."""
    parent = tmp_path_factory.mktemp("projects")
    done = run(["fedpipe", "new", NAME, "--dir", str(parent)], parent.parent)
    assert done.returncode == 0, done.stderr
    project = parent / NAME
    files = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    return project, done.stdout, files


@pytest.fixture
def project(created: tuple[Path, str, set[str]]) -> Path:
    return created[0]


def test_new_writes_the_project_files_with_its_name_filled_in(
    created: tuple[Path, str, set[str]],
) -> None:
    project, stdout, files = created
    assert files == FILES
    assert f"wrote {len(FILES)} files in {project}/" in stdout
    assert "PYTHONPATH=. fedpipe simulate --config simulation.toml" in stdout
    for relative in files:
        text = (project / relative).read_text()
        assert "{{" not in text and "NAME" not in relative, relative
        if relative.endswith(".py"):
            ast.parse(text, relative)  # a bad substitution would not parse
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "demo-proj"
    assert pyproject["project"]["dependencies"] == [f"fedpipe>={fedpipe.__version__}"]
    entry_points = pyproject["project"]["entry-points"]["fedpipe.plugins"]
    assert entry_points == {NAME: f"{NAME}.modules"}
    assert f'name: ClassVar[str] = "{MODULE}"' in (project / NAME / "modules.py").read_text()


def test_generated_configs_validate_and_agree(project: Path) -> None:
    sim = load_config(SimulationConfig, project / "simulation.toml")
    server = load_config(ServerConfig, project / "server.toml")
    client = load_config(ClientConfig, project / "client.toml")
    plugin = [f"{NAME}.modules"]
    assert sim.plugins == server.plugins == client.plugins == plugin
    assert sim.dataset == "digits"
    for config in (sim.server, server):
        assert config.model.name == f"{NAME}.models:build"
        assert config.model.config == {"n_features": 64, "n_classes": 10, "hidden": [32]}
        assert config.client_optimizer.modules == [[MODULE, {"beta": 0.9}]]
    assert client.trusted_models == [server.model.name]  # the client builds the server's model
    assert client.data == Path("data/client_0")  # what the README's `fedpipe split` writes


def test_generated_code_is_ruff_clean(project: Path) -> None:
    pytest.importorskip("ruff")  # a dev dependency
    for command in (["check"], ["format", "--check"]):
        done = run(["ruff", *command, "--no-cache", "."], project)
        assert done.returncode == 0, done.stdout + done.stderr


def test_simulation_runs_from_the_project_folder(project: Path) -> None:
    out = project / "runs" / "check"
    done = run(
        ["fedpipe", "simulate", "--config", "simulation.toml", "--output-dir", str(out)],
        project,
        project,  # PYTHONPATH=. as the README says
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final:" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 10
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 10 and last["accuracy"] > ACCURACY_FLOOR, last
    assert (out / "best_model.npz").is_file()


def test_generated_tests_pass_under_pytest(project: Path) -> None:
    done = run(["pytest", "-q", "-p", "no:cacheprovider"], project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout, done.stdout


def test_installed_project_is_found_by_its_entry_point(project: Path, tmp_path: Path) -> None:
    """As after ``pip install``: the package and a ``.dist-info`` that declares the entry
    point of the generated pyproject.toml, in a folder on the path; no ``plugins`` anywhere."""
    site = tmp_path / "site-packages"
    shutil.copytree(project / NAME, site / NAME, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    entry_points = pyproject["project"]["entry-points"]["fedpipe.plugins"]
    write_dist_info(site, "demo_proj", "0.1.0", entry_points)
    args = ["fedpipe", "simulate", "--config", str(project / "simulation.toml")]
    args += ["--set", "plugins=[]", "--rounds", "2", "--output-dir", str(tmp_path / "run")]

    done = run(args, tmp_path, site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"

    # The package alone, without its metadata: nothing tells fedpipe where the module is.
    done = run([*args[:-1], str(tmp_path / "run2")], project, project)
    assert done.returncode == 2
    assert f"unknown module {MODULE!r}" in done.stderr, done.stderr


def test_project_builds_a_wheel_with_its_package_and_entry_point(
    project: Path, tmp_path: Path
) -> None:
    pytest.importorskip("setuptools")  # the build backend; offline: no isolated build env
    source = tmp_path / "source"
    shutil.copytree(project, source, ignore=shutil.ignore_patterns("runs", "__pycache__"))
    args = ["pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-q"]
    done = run([*args, "-w", str(tmp_path / "dist"), str(source)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("demo_proj-0.1.0-*.whl")
    shutil.unpack_archive(wheel, tmp_path / "site", "zip")
    site = tmp_path / "site"
    assert (site / NAME / "modules.py").read_text() == (project / NAME / "modules.py").read_text()
    entry_points = (site / "demo_proj-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert entry_points.split() == ["[fedpipe.plugins]", NAME, "=", f"{NAME}.modules"]


def test_server_and_clients_run_from_the_generated_configs(project: Path) -> None:
    """The README's four commands, on a free port and for two rounds."""
    split = ["fedpipe", "split", "--dataset", "digits", "--clients", "2", "--out", "data"]
    assert run(split, project).returncode == 0
    port = free_port()
    server = ["fedpipe", "server", "--config", "server.toml", "--port", str(port)]
    procs = [spawn([*server, "--rounds", "2", "--progress", "none"], project, project)]
    for i in range(2):
        client = ["fedpipe", "client", "--config", "client.toml", "--name", f"client-{i}"]
        client += ["--data", f"data/client_{i}", "--server", f"127.0.0.1:{port}"]
        procs.append(spawn(client, project, project))
    deadline = time.monotonic() + TIMEOUT
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    summary = json.loads((project / "runs" / "server" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    clients = [json.loads(line) for line in (project / "runs" / "server" / "clients.jsonl").open()]
    assert {c["client"] for c in clients if c.get("replied")} == {"client-0", "client-1"}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("1project", "is not a Python identifier"),
        ("my-project", "is not a Python identifier"),
        ("_private", "starts or ends with '_'"),
        ("class", "is a Python keyword"),
        ("json", "standard library"),
        ("numpy", "is taken: a module of that name is installed"),
        ("tests", "tests folder"),
    ],
)
def test_a_bad_name_is_one_line_and_exit_2(
    name: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new", name, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedpipe new: project name {name!r} ") and why in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    (folder / "notes.txt").write_text("mine")
    assert main(["new", NAME, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedpipe new: {folder} exists and is not empty; choose another NAME or --dir, or give "
        "--force to overwrite the project's files in it\n"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "notes.txt"]
    assert (folder / "README.md").read_text() == "mine"

    assert main(["new", NAME, "--dir", str(tmp_path), "--force"]) == 0
    assert (folder / "README.md").read_text().startswith(f"# {NAME}\n")
    assert (folder / "notes.txt").read_text() == "mine"  # not the template's: left alone
    assert (folder / "simulation.toml").is_file()

    (tmp_path / "afile").write_text("")
    assert main(["new", "afile", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'afile'} exists and is not a folder\n")


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / NAME).mkdir()
    assert main(["new", NAME, "--dir", str(tmp_path)]) == 0
    assert (tmp_path / NAME / "pyproject.toml").is_file()


def test_package_data_ships_every_template() -> None:
    """An installed fedpipe has the templates only if pyproject's package-data names them."""
    pyproject = tomllib.loads((FEDPIPE_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fedpipe"]
    package = FEDPIPE_ROOT / "fedpipe"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    templates = {p for p in (package / "templates").rglob("*") if p.is_file()}
    templates = {p for p in templates if "__pycache__" not in p.parts}
    assert len(templates) == len(FILES)
    assert templates <= shipped, sorted(map(str, templates - shipped))
