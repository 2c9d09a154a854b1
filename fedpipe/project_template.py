"""``fedpipe new NAME``: a runnable project package written from the files of
``fedpipe/templates/project/``.

Every template file ends in ``.tmpl``; its path and text name the project through
placeholders: ``NAME`` in a path, and ``{{name}}`` (the package), ``{{dist_name}}`` (the
distribution), ``{{module_name}}`` (its optimizer module's registry name) and
``{{fedpipe_version}}`` in the text. A file name that starts with ``dot-`` is written with a
leading ``.`` instead.
"""

from __future__ import annotations

import importlib.util
import keyword
import sys
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from fedpipe import __version__

__all__ = ["ProjectError", "ProjectFile", "check_name", "render_project", "write_project"]

#: Names the project's package cannot take: its own tests folder would hide it.
RESERVED = frozenset({"tests", "test"})


class ProjectError(ValueError):
    """The project cannot be written (a bad name, a folder in the way); the message says why."""


@dataclass(frozen=True)
class ProjectFile:
    """One file of a new project: its path relative to the project folder, and its text."""

    path: PurePosixPath
    text: str


def render_project(name: str) -> list[ProjectFile]:
    """The files of project ``name``, placeholders filled in.

    Raises
    ------
    ProjectError
        ``name`` is not a usable Python package name (see :func:`check_name`).
    """
    check_name(name)
    values = {
        "{{name}}": name,
        "{{dist_name}}": name.replace("_", "-"),
        "{{module_name}}": f"{name.replace('_', '-')}-signum",
        "{{fedpipe_version}}": __version__,
    }
    rendered = []
    for relative, template in _templates(files("fedpipe") / "templates" / "project"):
        text = template.read_text(encoding="utf-8")
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        rendered.append(ProjectFile(_target(relative, name), text))
    return rendered


def write_project(name: str, parent: Path, *, force: bool = False) -> tuple[Path, list[Path]]:
    """Write project ``name`` to ``parent/name``; return that folder and the files written.

    Raises
    ------
    ProjectError
        A bad name; or ``parent/name`` is a file, or a non-empty folder and ``force`` is not
        set (with ``force``, the project's files replace theirs; other files stay).
    """
    project_files = render_project(name)
    folder = parent / name
    _check_shadowing(name, folder)
    if folder.exists() and not folder.is_dir():
        raise ProjectError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ProjectError(
            f"{folder} exists and is not empty; choose another NAME or --dir, or give --force "
            "to overwrite the project's files in it"
        )
    written = []
    for item in project_files:
        path = folder.joinpath(*item.path.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item.text, encoding="utf-8")
        written.append(path)
    return folder, written


def check_name(name: str) -> None:
    """Raise :class:`ProjectError` unless ``name`` can be the project's Python package."""
    if not name.isidentifier() or not name.isascii():
        raise ProjectError(
            f"project name {name!r} is not a Python identifier; expected ASCII letters, digits "
            "and underscores, not starting with a digit (e.g. 'my_project')"
        )
    if name.startswith("_") or name.endswith("_"):
        raise ProjectError(
            f"project name {name!r} starts or ends with '_'; a distribution name cannot "
            "(pyproject.toml names it with '-' for '_'); choose another"
        )
    if keyword.iskeyword(name):
        raise ProjectError(f"project name {name!r} is a Python keyword; choose another name")
    if name in RESERVED:
        raise ProjectError(f"project name {name!r} is the name of its tests folder; choose another")
    if name in sys.stdlib_module_names:
        raise ProjectError(
            f"project name {name!r} is a module of Python's standard library; choose another"
        )


def _check_shadowing(name: str, folder: Path) -> None:
    """Refuse a name an installed package already has (its import would pick one of the two),
    unless that package is this very project, written again with ``--force``."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:  # not importable, or a namespace (a bare folder)
        return
    origin = Path(spec.origin).resolve()
    if not origin.is_relative_to(folder.resolve()):
        raise ProjectError(
            f"project name {name!r} is taken: a module of that name is installed ({origin}), "
            "and one would hide the other; choose another name"
        )


def _templates(
    root: Traversable, prefix: PurePosixPath | None = None
) -> list[tuple[PurePosixPath, Traversable]]:
    """Every ``.tmpl`` file under ``root``, with its path relative to ``root``, sorted."""
    found = []
    for entry in root.iterdir():
        relative = PurePosixPath(entry.name) if prefix is None else prefix / entry.name
        if entry.is_dir():
            found += _templates(entry, relative)
        elif entry.name.endswith(".tmpl"):
            found.append((relative, entry))
    return sorted(found, key=lambda pair: str(pair[0]))


def _target(relative: PurePosixPath, name: str) -> PurePosixPath:
    """Where a template file goes in project ``name``."""
    parts = [part.replace("NAME", name) for part in relative.parts]
    leaf = parts[-1].removesuffix(".tmpl")
    parts[-1] = "." + leaf.removeprefix("dot-") if leaf.startswith("dot-") else leaf
    return PurePosixPath(*parts)
