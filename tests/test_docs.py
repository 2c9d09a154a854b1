"""docs/ tells the truth: its code runs, its links resolve, its command lines parse.

- ``docs/writing-a-module.md``: the module is written to a package folder exactly as the page
  shows, checked by the page's own code against the built-in ``rmsprop``, then used by name
  through the plugin mechanism by the page's ``fedpipe simulate`` command lines (in-process
  and over gRPC) and through the entry point the page declares.
- Every relative link of ``docs/*.md`` and ``README.md`` names an existing file (and, with a
  ``#fragment``, an existing heading).
- Every ``fedpipe ...`` line of their shell blocks parses with the real argparse parser. A line
  holding a placeholder (``[--token ...]``, ``<NAME>``, ``...``) cannot parse as written: it is
  skipped, and the skipped lines are listed in the test's output.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fedpipe
from fedpipe.cli import build_parser, main
from fedpipe.common import plugins, registry
from fedpipe.common.vector import Vector
from tests.plugin_packages import write_dist_info

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [*DOCS, ROOT / "README.md", ROOT / "deploy" / "README.md"]
TUTORIAL = ROOT / "docs" / "writing-a-module.md"
MODULE_NAME = "tutorial-rmsprop"


def code_blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    pattern = rf"^```(?:{'|'.join(languages)})\n(.*?)^```"
    return re.findall(pattern, path.read_text(), flags=re.S | re.M)


def block_for(path: Path, language: str, first_line: str) -> str:
    """The block whose first line is ``first_line`` (a file name as a comment)."""
    (block,) = [b for b in code_blocks(path, (language,)) if b.splitlines()[0] == first_line]
    return block


@pytest.fixture
def user_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The tutorial's package folder, on ``sys.path`` and the working directory; the registry,
    the entry-point state and ``sys.modules`` are as before once the test is over."""
    before = {family: set(table) for family, table in registry._REGISTRY.items()}
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").touch()
    (tmp_path / "mypkg" / "fedext.py").write_text(
        block_for(TUTORIAL, "python", "# mypkg/fedext.py")
    )
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]
    # forget the tutorial's classes only: fedpipe's own, registered by imports during the
    # test (server-side families register when their module is first imported), stay
    for family, table in registry._REGISTRY.items():
        for name in set(table) - before.get(family, set()):
            if table[name].__module__.split(".")[0] != "fedpipe":
                del table[name]


def model(path: Path) -> Vector:
    with np.load(path, allow_pickle=False) as npz:
        return Vector({k: npz[k] for k in npz.files})


def test_tutorial_module_matches_rmsprop_and_runs_by_name_in_simulations(
    user_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert MODULE_NAME not in registry.names("module")  # nothing imported it yet
    (check,) = [b for b in code_blocks(TUTORIAL, ("python",)) if "import_plugins" in b]
    exec(compile(check, str(TUTORIAL), "exec"), {"__name__": "tutorial_check"})  # noqa: S102
    assert capsys.readouterr().out == "tutorial-rmsprop matches rmsprop\n"
    assert registry.get_class("module", MODULE_NAME).__module__ == "mypkg.fedext"

    sim_toml = block_for(TUTORIAL, "toml", "# sim.toml")
    (user_folder / "sim.toml").write_text(sim_toml)
    commands = [
        line.split("#")[0].split()
        for line in code_blocks(TUTORIAL, ("sh",))[0].splitlines()
        if line.startswith("fedpipe simulate")
    ]
    assert [c[-1] for c in commands] == ["sim.toml", "grpc"]
    for i, command in enumerate(commands):
        assert main([*command[1:], "--output-dir", f"run-{i}"]) == 0, capsys.readouterr()

    # The same simulation with fedpipe's own rmsprop gives the same model.
    config = tomllib.loads(sim_toml)
    config["server"]["client_optimizer"]["modules"] = [["rmsprop", {"beta": 0.9, "eps": 1e-7}]]
    reference = fedpipe.simulate(config, overrides={"server.output_dir": "reference"})
    assert reference.metric("accuracy")[-1][1] > 0.5  # 5 rounds of digits: it learned
    assert model(user_folder / "run-0" / "model.npz").allclose(reference.weights, rtol=1e-12)
    # Real processes imported the plugin too; replies summed in another order may round apart.
    grpc = model(user_folder / "run-1" / "model.npz")
    assert grpc.allclose(reference.weights, rtol=1e-5, atol=1e-6)


def test_tutorial_entry_point_makes_the_name_known_without_a_flag(user_folder: Path) -> None:
    declared = tomllib.loads(block_for(TUTORIAL, "toml", "# pyproject.toml of mypkg"))
    group = declared["project"]["entry-points"]["fedpipe.plugins"]
    assert group == {"fedext": "mypkg.fedext"}
    write_dist_info(user_folder, "mypkg", "0.1", group)  # as `pip install -e .` would
    assert "mypkg.fedext" not in sys.modules
    module = registry.build("module", MODULE_NAME, {"beta": 0.5})
    assert type(module).__module__ == "mypkg.fedext"
    assert module.get_config() == {"beta": 0.5, "eps": 1e-7}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_points_to_an_existing_file_and_heading() -> None:
    assert {p.name for p in DOCS} >= {
        "architecture.md",
        "deployment.md",
        "security.md",
        "writing-a-module.md",
    }
    checked, broken = 0, []
    for path in MARKDOWN:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not a file of this repository
            file, _, fragment = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            checked += 1
            if not resolved.exists():
                broken.append(f"{path.name}: {target} ({resolved} does not exist)")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{path.name}: {target} (no heading #{fragment})")
    assert not broken, "\n".join(broken)
    assert checked >= 20  # README links into docs/, docs link to each other and to the code


PLACEHOLDER = re.compile(r"\[--|<[A-Z_a-z]+>|\.\.\.")
SHELL_OPERATOR = re.compile(r"\s(<|>|\||&&|;)\s")


def command_lines() -> Iterator[tuple[str, str]]:
    """``(file, line)`` for each ``fedpipe`` command of a shell block, continuations joined,
    comments and shell redirections removed."""
    for path in MARKDOWN:
        for block in code_blocks(path, ("sh", "bash", "console", "shell")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                line = SHELL_OPERATOR.split(line)[0]
                if line.startswith("fedpipe ") or line == "fedpipe":
                    yield path.name, line


def test_every_fedpipe_command_line_in_the_docs_parses(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    parsed, skipped, failures = 0, [], []
    for name, line in command_lines():
        words = shlex.split(line, comments=True)
        if PLACEHOLDER.search(" ".join(words)):
            skipped.append(f"{name}: {line}")
            continue
        try:
            parser.parse_args(words[1:])
        except SystemExit as exc:
            if exc.code != 0:  # 0: --help / --version
                failures.append(f"{name}: {line}\n    {capsys.readouterr().err.strip()}")
        parsed += 1
    assert not failures, "\n".join(failures)
    assert parsed >= 20
    with capsys.disabled():
        print(f"\n{parsed} fedpipe command lines parsed; skipped (placeholders): {skipped}")


BYO = ROOT / "docs" / "bring-your-own-training.md"


async def test_byo_training_page_runs_a_federation_of_its_own_clients(user_folder: Path) -> None:
    """The page's package, configs and command lines: two client daemons with the page's
    DataLoaders and train_fn, against a real server, learn digits."""
    pytest.importorskip("torch")
    from fedpipe.cli import _client_data
    from fedpipe.client.daemon import ClientDaemon
    from fedpipe.common.config import ClientConfig, ServerConfig, load_config
    from fedpipe.server.simulation import free_port
    from tests.integration.conftest import running_server

    (user_folder / "mypkg" / "byo.py").write_text(block_for(BYO, "python", "# mypkg/byo.py"))
    for name in ("client.toml", "server.toml"):
        (user_folder / name).write_text(block_for(BYO, "toml", f"# {name}"))
    page = [shlex.split(line) for name, line in command_lines() if name == BYO.name]
    lines = [words for words in page if words[1] == "client"]
    (split,) = [words for words in page if words[1] == "split"]
    assert main(split[1:]) == 0
    port = free_port()
    server = load_config(
        ServerConfig, Path("server.toml"), {"port": port, "output_dir": str(user_folder / "run")}
    )
    daemons = []
    for words in lines:  # the page's two client command lines, on a free port
        flags = dict(zip(words[2::2], words[3::2], strict=True))
        overrides = {"server": f"127.0.0.1:{port}", "name": flags["--name"]}
        if "--data" in flags:
            overrides["data"] = flags["--data"]
        config = load_config(ClientConfig, Path(flags["--config"]), overrides)
        assert config.train_fn == "mypkg.byo:train"
        daemons.append(ClientDaemon(config, *_client_data(config)))
    async with running_server(server) as run:
        clients = [asyncio.create_task(d.run()) for d in daemons]
        summary = await asyncio.wait_for(run, 180)
        codes = await asyncio.wait_for(asyncio.gather(*clients), 60)
    assert codes == [0, 0] and summary.rounds_completed == 5
    assert summary.history[-1]["accuracy"] >= 0.85, summary.history[-1]
