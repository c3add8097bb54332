"""vLLM as the generation engine of `loraflow deploy --engine vllm` (CUDA machines only).

No vLLM release installs beside loraflow's pins (see the Makefile's `vllm` target), so vLLM runs as its own program
from its own environment: `vllm serve` on the base model, on a loopback port, started by loraflow deploy, with each
registered version's LoRA adapter loaded into it at run time (vLLM's runtime adapter loading). A new version adds an
adapter; the base model is loaded once. Requests are checked and rendered exactly as by TunedChatModel (the same
chat template gives the same prompt tokens, sent to vLLM as token ids); only generation differs.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from conf.schema import UserError
from tasks.base_model import TRUST_REMOTE_CODE_ENV, check_base_identity, is_adapter, resolve_base_model
from tasks.chat_model import TunedChatModel
from tasks.generation import Answer, chat_prompts
from tasks.health import wait_until_healthy
from tasks.logged_model import download_tuned

VLLM_ENV = "LORAFLOW_VLLM"  # the `vllm` program to run (default: .venv-vllm/bin/vllm, then `vllm` on PATH)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
MIN_SERVER_RANK = 64  # room for later versions trained at a higher rank than the first one served
START_SECONDS = 900  # loading the model and capturing CUDA graphs takes minutes on a big model
WHOLE_MODEL = "loraflow-whole-model"  # the served name of a fully trained model (no adapter)


def vllm_program() -> str:
    """The `vllm` program loraflow starts, or UserError saying how to install it."""
    for candidate in (os.environ.get(VLLM_ENV), ".venv-vllm/bin/vllm", shutil.which("vllm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    raise UserError("--engine vllm: vLLM is not installed; on the GPU machine run `make vllm` (its own environment, "
                    f".venv-vllm) or name the program in {VLLM_ENV}")


def check_vllm_runs() -> str:
    """The `vllm` program to run, or UserError saying why vLLM cannot serve here."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--engine vllm: no CUDA GPU is visible here, and vLLM serves on CUDA only; "
                        "the default --engine transformers serves on this machine")
    return vllm_program()


def adapter_rank(weights_dir: Path) -> int | None:
    """The highest LoRA rank in an adapter (None for a whole model); adapters vLLM cannot apply are refused here."""
    if not is_adapter(weights_dir):
        return None
    config = json.loads((weights_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise UserError(f"{weights_dir}: a DoRA adapter, which vLLM cannot apply; serve it with --engine transformers")
    if config.get("modules_to_save"):
        raise UserError(f"{weights_dir}: the adapter trains whole modules ({', '.join(config['modules_to_save'])}) "
                        "besides LoRA, which vLLM cannot apply; serve it with --engine transformers")
    return int(max([config["r"], *(config.get("rank_pattern") or {}).values()]))


def server_rank(rank: int) -> int:
    """The --max-lora-rank to start vLLM with for an adapter of `rank`."""
    fitting = [allowed for allowed in VLLM_LORA_RANKS if allowed >= max(rank, MIN_SERVER_RANK)]
    if not fitting:
        raise UserError(f"LoRA rank {rank}: vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def _post(url: str, body: dict, timeout: float) -> bytes:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"vLLM answered {error.code} to {url}: {error.read().decode(errors='replace')[:300]}") from None


class VllmServer:
    """`vllm serve` on one model folder, on a free loopback port, stopped when loraflow exits."""

    def __init__(self, program: str, model_dir: str, max_lora_rank: int | None, trust_remote_code: bool):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.max_lora_rank = f"http://127.0.0.1:{port}", max_lora_rank or 0
        command = [program, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                   "--served-model-name", WHOLE_MODEL]
        if max_lora_rank:
            command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "2"]
        if trust_remote_code:
            command.append("--trust-remote-code")
        self.log = tempfile.NamedTemporaryFile(prefix="loraflow-vllm-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
        atexit.register(self.stop)
        self._wait_ready()

    def _wait_ready(self) -> None:
        if wait_until_healthy(f"{self.url}/health", self.process, START_SECONDS, interval=2):
            return
        if self.process.poll() is not None:
            lines = Path(self.log.name).read_text(errors="replace").strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"vllm serve exited with {self.process.returncode}: {lines[-1]} "
                               f"(whole log: {self.log.name})")
        self.stop()
        raise RuntimeError(f"vllm serve was not ready after {START_SECONDS} s (log: {self.log.name})")

    def load_adapter(self, name: str, path: Path) -> None:
        _post(f"{self.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, timeout=300)

    def complete(self, model: str, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[Answer]:
        """One completion per prompt (token ids), in one request: vLLM batches them on the GPU. `logprobs: 0` lists
        each completion's tokens, which its usage (one sum for all prompts) does not count apart."""
        body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": temperature, "logprobs": 0}
        choices = json.loads(_post(f"{self.url}/v1/completions", body, timeout=600))["choices"]
        return [Answer(choice["text"].strip(), len(choice["logprobs"]["tokens"]), choice["finish_reason"] == "stop")
                for choice in sorted(choices, key=lambda choice: choice["index"])]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


_servers: dict[str, VllmServer] = {}  # model folder -> its server: one per base model in this process


def _server(program: str, model_dir: str, rank: int | None, trust_remote_code: bool) -> VllmServer:
    if model_dir not in _servers:
        _servers[model_dir] = VllmServer(program, model_dir, server_rank(rank) if rank else None, trust_remote_code)
    server = _servers[model_dir]
    if rank is not None and rank > server.max_lora_rank:
        raise UserError(f"LoRA rank {rank} is over the running vLLM's {server.max_lora_rank}; restart loraflow deploy "
                        "to serve it")
    return server


class VllmChatModel(TunedChatModel):
    """A registered version served by vLLM: TunedChatModel's requests and answers, vLLM's generation."""

    def __init__(self, program: str, name: str, weights_dir: Path, config: dict, trust_remote_code: bool):
        check_base_identity(config)
        rank = adapter_rank(weights_dir)
        model_dir = resolve_base_model(config["base_model"]) if rank is not None else str(weights_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
        self.max_new_tokens = int(config.get("max_new_tokens", 128))
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.context_length = int(getattr(model_config, "max_position_embeddings", 0) or 2048)
        self.server = _server(program, model_dir, rank, trust_remote_code)
        self.served_name = name if rank is not None else WHOLE_MODEL
        if rank is not None:
            self.server.load_adapter(name, weights_dir)

    def answer(self, conversations: list[list[dict]], max_tokens: int, temperature: float) -> list[Answer]:
        """Answers to checked conversations, in one request to vLLM, on the prompt tokens TunedChatModel renders."""
        prompts = [self.tokenizer(text, add_special_tokens=False)["input_ids"]
                   for text in chat_prompts(self.tokenizer, conversations)]
        return self.server.complete(self.served_name, prompts, max_tokens, temperature)


def load_vllm_version(uri: str) -> VllmChatModel:
    """A registered version (`models:/name/N`) served by vLLM. Its files stay for the process's life: vLLM reads
    the adapter from them."""
    program = check_vllm_runs()
    weights_dir, config = download_tuned(uri, Path(tempfile.mkdtemp(prefix="loraflow-vllm-")))
    name = uri.removeprefix("models:/")
    return VllmChatModel(program, name, weights_dir, config, os.environ.get(TRUST_REMOTE_CODE_ENV) == "1")
