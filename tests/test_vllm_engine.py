"""`loraflow deploy --engine vllm`: where vLLM cannot run it stops with one line, and adapters vLLM cannot apply are
refused with their reason. vLLM's serving itself needs a CUDA GPU and `make vllm`, neither of which CI has."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_vllm_engine_without_a_gpu_stops_with_one_line_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "no-such-model", "--engine", "vllm"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "no CUDA GPU" in result.stderr and "--engine transformers" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # stopped before touching the registry


def test_vllm_engine_on_a_gpu_without_vllm_says_how_to_install_it(monkeypatch, tmp_path):
    import torch

    from conf.schema import UserError
    from tasks.vllm_engine import VLLM_ENV, check_vllm_runs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(VLLM_ENV, raising=False)
    with pytest.raises(UserError, match="make vllm"):
        check_vllm_runs()
    program = tmp_path / "vllm"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert check_vllm_runs() == str(program)  # found on PATH


def test_vllm_engine_takes_lora_ranks_it_can_serve_and_refuses_adapters_it_cannot_apply(tmp_path):
    from conf.schema import UserError
    from tasks.vllm_engine import adapter_rank, server_rank

    def adapter_folder(name, **config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8} | config))
        return folder

    assert adapter_rank(adapter_folder("plain")) == 8
    assert adapter_rank(adapter_folder("pattern", rank_pattern={"q_proj": 96})) == 96
    whole = tmp_path / "whole"
    whole.mkdir()
    assert adapter_rank(whole) is None  # a fully trained model: no adapter to apply
    with pytest.raises(UserError, match="DoRA"):
        adapter_rank(adapter_folder("dora", use_dora=True))
    with pytest.raises(UserError, match="lm_head"):
        adapter_rank(adapter_folder("saved", modules_to_save=["lm_head"]))
    assert [server_rank(rank) for rank in (8, 64, 65, 96, 512)] == [64, 64, 128, 128, 512]
    with pytest.raises(UserError, match="up to 512"):
        server_rank(1024)
