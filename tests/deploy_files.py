"""The files of deploy/ as a user's tools read them: compose and Kubernetes YAML, the
Dockerfile's final stage, .dockerignore patterns, systemd units, the configs they name."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the deploy files")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

#: What deploy/make-secrets.sh writes for the server and for each client.
SERVER_FILES = {"ca.crt", "server.crt", "server.key", "health.crt", "health.key", "server.toml"}
CLIENT_FILES = {"ca.crt", "client.crt", "client.key", "client.token"}
#: Where the containers find their secrets and keep what they write.
SECRETS_DIR = PurePosixPath("/etc/fedpipe/secrets")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def k8s_objects() -> list[dict[str, Any]]:
    """Every object of the manifests kustomization.yaml lists, in order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return objects


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == kind]


def pod_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def dockerfile_stage() -> list[tuple[str, str]]:
    """The final stage's instructions as (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    stages = [i for i, (word, _) in enumerate(instructions) if word.upper() == "FROM"]
    return [(word.upper(), " ".join(rest.split())) for word, rest in instructions[stages[-1] :]]


def dockerfile_value(instruction: str) -> str:
    values = [args for word, args in dockerfile_stage() if word == instruction]
    assert values, f"deploy/Dockerfile's final stage has no {instruction}"
    return values[-1]


def image_uid() -> int:
    return int(dockerfile_value("USER").split(":")[0])


def image_volumes() -> list[str]:
    return list(json.loads(dockerfile_value("VOLUME")))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``docker build`` leaves ``path`` out of the context: the last pattern that
    matches the path or one of its parent folders decides (``!`` puts it back)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not keep
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token)
        )
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def systemd_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / name)
    return parser


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """Every command line the deploy files run, with where it is written."""
    for name, service in compose()["services"].items():
        for key in ("entrypoint", "command"):
            if key in service:
                yield f"compose {name}.{key}", list(service[key])
        test = service.get("healthcheck", {}).get("test")
        if test:
            yield f"compose {name}.healthcheck", list(test[1:])
    for job in k8s_kind("Job"):
        for container in pod_containers(job):
            where = f"k8s {job['metadata']['name']}/{container['name']}"
            yield where, [*container.get("command", []), *container.get("args", [])]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    yield f"{where}.{probe}", list(container[probe]["exec"]["command"])
    for unit in ("fedpipe-server.service", "fedpipe-client.service"):
        yield unit, shlex.split(systemd_unit(unit)["Service"]["ExecStart"])
    for word, args in dockerfile_stage():
        if word == "HEALTHCHECK":
            yield "Dockerfile HEALTHCHECK", list(json.loads(args.split(" CMD ", 1)[1]))


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def linter(name: str) -> str:
    """The linter's path; the dev extra installs it. CI fails without it, a developer's run
    skips (saying so) until `make install` has run again."""
    bindir = Path(sys.executable).parent
    found = shutil.which(name, path=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: CI must run the deploy linters")
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def build_context(dest: Path) -> list[str]:
    """Copy what ``docker build`` would be sent (the repository less .dockerignore) to
    ``dest``; returns the paths copied. Ignored folders are not walked into."""
    patterns = dockerignore_patterns()
    reincluded = [p.lstrip("!").strip("/") for p in patterns if p.startswith("!")]
    copied = []
    for top, dirs, files in os.walk(ROOT):
        rel = Path(top).relative_to(ROOT)
        dirs[:] = [
            d
            for d in dirs
            if not dockerignored((rel / d).as_posix(), patterns)
            or any(r.startswith(f"{(rel / d).as_posix()}/") for r in reincluded)
        ]
        for name in files:
            path = (rel / name).as_posix()
            if not dockerignored(path, patterns):
                (dest / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, dest / path)
                copied.append(path)
    return copied
