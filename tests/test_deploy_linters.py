"""deploy/ through the tools that read it, as far as a machine without a Docker daemon or a
cluster allows: hadolint, yamllint, Kubernetes' schemas (strict), shellcheck,
`systemd-analyze verify` and `docker-compose config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.deploy_files import DEPLOY, K8S, ROOT, build_context, linter


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    said = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, said


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = run(linter("hadolint"), "--failure-threshold", "info", "deploy/Dockerfile")
    assert_clean(result)
    assert result.stdout.strip() == ""


def test_yamllint_finds_nothing_in_the_compose_and_kubernetes_files() -> None:
    files = ["deploy/compose.yaml", *(str(p.relative_to(ROOT)) for p in K8S.glob("*.yaml"))]
    assert len(files) >= 6
    result = run(linter("yamllint"), "--strict", "-c", ".yamllint.yaml", *files)
    assert_clean(result)


def test_the_kubernetes_manifests_fit_the_kubernetes_schemas_strictly() -> None:
    manifests = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = run(linter("kubernetes-validate"), "--strict", "--no-warn", *manifests)
    assert_clean(result)
    # One line per object that passed: the PVCs, the Service, the ConfigMap, the Jobs.
    assert result.stdout.count(" passed ") == 8, result.stdout


def test_shellcheck_finds_nothing_in_make_secrets() -> None:
    assert_clean(run(linter("shellcheck"), "--shell=sh", "deploy/make-secrets.sh"))


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: the units name /opt/fedpipe/.venv, this venv here.
    fedpipe = Path(sys.executable).parent / "fedpipe"
    assert fedpipe.exists(), "the fedpipe command of this venv"
    units = []
    for name in ("fedpipe-server.service", "fedpipe-client.service"):
        text = (DEPLOY / name).read_text()
        assert "ExecStart=/opt/fedpipe/.venv/bin/fedpipe " in text
        (tmp_path / name).write_text(text.replace("/opt/fedpipe/.venv/bin/fedpipe", str(fedpipe)))
        units.append(str(tmp_path / name))
    result = run(linter("systemd-analyze"), "verify", *units)
    assert_clean(result)
    # Unknown keys and bad values are only warnings to systemd: none may be printed.
    assert (result.stdout + result.stderr).strip() == ""


def test_docker_compose_renders_the_compose_file() -> None:
    result = run(linter("docker-compose"), "-f", "deploy/compose.yaml", "config")
    assert_clean(result)
    for name in ("certs", "demo-data", "server", "client-0", "client-1"):
        assert f"\n  {name}:\n" in result.stdout


def test_the_image_install_step_builds_fedpipe_from_the_build_context_alone(
    tmp_path: Path,
) -> None:
    # `pip install ".[certs]"` as the Dockerfile runs it, on the files .dockerignore lets
    # through; the dependencies come from this venv (no network, no Docker).
    context = tmp_path / "context"
    copied = build_context(context)
    assert "pyproject.toml" in copied and "fedpipe/datasets/digits.npz" in copied
    assert not [p for p in copied if p.startswith((".venv/", "tests/", "runs/", ".git/"))]
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    assert_clean(run(*pip, "--target", str(target), str(context)))
    env = dict(os.environ, PYTHONPATH=str(target))

    def installed(*argv: str) -> subprocess.CompletedProcess[str]:
        # Run away from the checkout: the installed package is the one imported.
        return subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    where = installed("-c", "import fedpipe; print(fedpipe.__file__)")
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    assert_clean(installed("-m", "fedpipe", "health", "--help"))
    # The built-in dataset is package data: it made it into the package.
    assert_clean(
        installed("-m", "fedpipe", "split", "--dataset", "digits", "--clients", "2", "--out", "s")
    )
    assert (tmp_path / "s" / "client_1" / "y.npy").exists()
