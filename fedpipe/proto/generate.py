"""Regenerate the Python code of every ``protos/**/*.proto`` into ``fedpipe/proto/``.

Usage: ``python -m fedpipe.proto.generate`` (or ``make protos``) from the repository root.

``protos/fedpipe/v1/tensor.proto`` becomes ``fedpipe/proto/fedpipe/v1/tensor_pb2.py`` (plus
``tensor_pb2_grpc.py`` and ``tensor_pb2.pyi``), importable as
``fedpipe.proto.fedpipe.v1.tensor_pb2``. protoc writes cross-file imports relative to the proto
root (``from fedpipe.v1 import tensor_pb2``); they are rewritten to live under
``fedpipe.proto``, so any number of protos importing each other work without touching
``sys.path``. Generated files of protos that no longer exist are removed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["PACKAGE", "generate", "generated_files"]

PACKAGE = "fedpipe.proto"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
OUT_DIR = REPO_ROOT / "fedpipe" / "proto"
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(out_dir: Path) -> dict[Path, bytes]:
    """Every generated file under ``out_dir`` (relative path -> content)."""
    files: dict[Path, bytes] = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if not path.is_file() or len(rel.parts) < 2 or "__pycache__" in rel.parts:
            continue  # top-level files (this script, __init__.py) are hand-written
        if path.name == "__init__.py" or path.name.endswith(_GENERATED_SUFFIXES):
            files[rel] = path.read_bytes()
    return files


def generate(proto_root: Path = PROTO_ROOT, out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile every ``.proto`` under ``proto_root`` into ``out_dir``; return the files written."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto file under {proto_root}")
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        new = _postprocess(Path(tmp), protos)

    for rel in generated_files(out_dir).keys() - new.keys():
        (out_dir / rel).unlink()
    for rel, content in new.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != content:
            target.write_bytes(content)
    _remove_empty_dirs(out_dir)
    return sorted(out_dir / rel for rel in new)


def _postprocess(tmp: Path, protos: list[str]) -> dict[Path, bytes]:
    """Rewrite the imports of protoc's output to live under :data:`PACKAGE`; add ``__init__``s."""
    packages = sorted({str(Path(p).parent).replace("/", ".") for p in protos} - {"."})
    modules = [p.removesuffix(".proto").replace("/", ".") + "_pb2" for p in protos]
    pkg = "|".join(re.escape(p) for p in packages)
    from_import = re.compile(rf"^(\s*)from ({pkg}) import ", re.MULTILINE)
    plain_import = re.compile(rf"^(\s*)import ({pkg})\.", re.MULTILINE)

    files: dict[Path, bytes] = {}
    for path in sorted(tmp.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if packages:
            text = from_import.sub(rf"\1from {PACKAGE}.\2 import ", text)
            text = plain_import.sub(rf"\1import {PACKAGE}.\2.", text)
        for module in modules:  # the module name protobuf gives the generated classes
            text = text.replace(f"'{module}'", f"'{PACKAGE}.{module}'")
        rel = path.relative_to(tmp)
        files[rel] = text.encode("utf-8")
        for parent in rel.parents:
            if parent != Path("."):
                files.setdefault(parent / "__init__.py", b"")
    return files


def _remove_empty_dirs(out_dir: Path) -> None:
    for path in sorted(out_dir.rglob("*"), reverse=True):
        if path.is_dir() and path.name == "__pycache__":
            continue
        if path.is_dir() and not any(p for p in path.iterdir() if p.name != "__pycache__"):
            shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help="proto root directory")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output package directory")
    args = parser.parse_args(argv)
    for path in generate(args.protos, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
