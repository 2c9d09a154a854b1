"""examples/lora_finetune: federated LoRA sends the adapters and the head, nothing else."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).parents[1] / "examples" / "lora_finetune"


def test_lora_example_federates_only_the_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("lora_run", EXAMPLE / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    args = ["--clients", "2", "--rounds", "1", "--samples", "96", "--epochs", "1"]
    result = run.main([*args, "--out", str(tmp_path)])
    # rank 4 on query and value of 2 layers of width 64, plus the 2-class head, in float32
    adapters = 2 * 2 * (4 * 64 + 64 * 4) * 4 + (2 * 64 + 2) * 4
    assert result["payload_bytes"] == adapters == 8712
    assert result["full_bytes"] > 50 * adapters
    assert len(result["history"]) == 1
    out = capsys.readouterr().out
    assert "(8,712 of adapters and head); full model" in out
    sys.modules.pop("lora_model", None)
