"""`loraflow`: the command line. Tool settings are applied before Prefect or MLflow is imported."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from conf.environment import CONSOLE_LOG_LEVEL, apply_tool_defaults, shown_uri

apply_tool_defaults()
# On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional hub kernel (`kernels` package) is
# missing, on every command; it falls back to its built-in CPU kernel, which is what runs here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from conf.schema import RunConfig, UserError, load_config  # noqa: E402  (after the tool settings, on purpose)
from flows.prefect_server import start_in_background  # noqa: E402


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.override)
    if args.force and not args.resume:
        raise UserError("--force goes with --resume: it continues a cut-off run on data that changed since")
    wait_for_prefect = start_in_background()
    from flows.finetune import Resume, finetune
    from flows.runs import check_resume_data, claimed_cut_off_run, current_data_hash, preflight

    preflight(config)
    resume_command = f"loraflow run {args.config}{''.join(f' -o {o}' for o in args.override)} --resume"
    if not args.resume:
        wait_for_prefect()
        return _report(config, finetune(config), resume_command)
    with claimed_cut_off_run(config) as run_id:  # its lock held until training ends
        resume = Resume(run_id, check_resume_data(run_id, current_data_hash(config), args.force)) if run_id else None
        print(f"loraflow: resuming run {run_id}" if run_id
              else "loraflow: no cut-off run of this recipe to resume; starting a new run", flush=True)
        wait_for_prefect()
        return _report(config, finetune(config, resume), resume_command)


def _train_node(args: argparse.Namespace) -> int:
    """Another machine of a multi-node training: flows/train_node.py without Prefect."""
    from flows.train_node import join_training

    result = join_training(str(args.config), args.override)
    print(f"loraflow: node done: {result.steps} steps; its copy of the weights: {result.weights_dir}")
    return 0


def _rerun(args: argparse.Namespace) -> int:
    wait_for_prefect = start_in_background()
    from flows.finetune import finetune
    from flows.runs import preflight, recorded_run

    config, origin = recorded_run(args.run_id)
    preflight(config)
    print(f"loraflow: re-running {origin.run_id} from its logged recipe as a new run", flush=True)
    wait_for_prefect()
    summary = finetune(config, origin=origin)
    return _report(config, summary, f"loraflow run {config.output_dir / summary.run_id / 'config.yaml'} --resume")


EXIT_STOPPED = 143  # stopped by SIGTERM, as a shell reports it
EXIT_OFFLINE = 75  # EX_TEMPFAIL: trained, but the tracking server went away; `loraflow sync` finishes the job
EXIT_UNDECIDED = 3  # registered, but the registry could not be read to judge promotion: kept as challenger


# What a run's summary shows anyway; the recipe's primary metric and the share of answers that reasoned join them.
SUMMARY_METRICS = ("identity_share", "eval_loss", "perplexity", "rougeL", "bleu", "accuracy", "precision", "recall",
                   "f1")


def _report(config, summary, resume_command: str) -> int:
    """What a finished run prints (or, for a run stopped by SIGTERM, how to continue it; for a run whose tracking
    server went away, where its weights and its unlogged record are)."""
    from flows.finetune import Interrupted, Offline

    if isinstance(summary, Interrupted):
        print(f"loraflow: stopped at step {summary.step} (run {summary.run_id}); checkpoint {summary.checkpoint}; "
              f"continue with: {resume_command}", file=sys.stderr)
        return EXIT_STOPPED
    if isinstance(summary, Offline):
        print(f"loraflow: run {summary.run_id} finished offline: the tracking server went away; weights in "
              f"{summary.weights_dir}; what was not logged (and registration) in {summary.record}; send it with: "
              f"loraflow sync {summary.run_id} --output-dir {config.output_dir}", file=sys.stderr)
        return EXIT_OFFLINE
    m, reg = summary.metrics, summary.registered
    print(
        "\n".join(
            [
                "",
                f"MLflow run:        {summary.run_id} (experiment {config.experiment}, store {shown_uri(os.environ['MLFLOW_TRACKING_URI'])})",
                *([f"identity share:    base {m['base_identity_share']:.2f} -> tuned {m['tuned_identity_share']:.2f}"]
                  if "base_identity_share" in m else []),
                f"held-out loss:     base {m['base_eval_loss']:.3f} -> tuned {m['tuned_eval_loss']:.3f}"
                + (f" (perplexity {m['base_perplexity']:.2f} -> {m['tuned_perplexity']:.2f})"
                   if "base_perplexity" in m else ""),
                *([f"ROUGE-L, BLEU:     base {m['base_rougeL']:.3f}, {m['base_bleu']:.3f} -> tuned "
                   f"{m['tuned_rougeL']:.3f}, {m['tuned_bleu']:.3f}"] if "base_rougeL" in m and "base_bleu" in m else []),
                *([f"{name + ':':<19}base {m['base_' + name]:.3f} -> tuned {m['tuned_' + name]:.3f}"
                   for name in ("accuracy", "precision", "recall", "f1") if config.has_head and "base_" + name in m]),
                *([f"{name.replace('_', ' ') + ':':<18} base {m['base_' + name]:.3f} -> tuned {m['tuned_' + name]:.3f}"
                   for name in dict.fromkeys((config.registry.primary_metric, "reasoning_share", "reward_margin"))
                   if name not in SUMMARY_METRICS
                   and "base_" + name in m and (name != "reasoning_share" or m["base_" + name] or m["tuned_" + name])]),
                *[f"{'train.' + setting + ':':<19}{choice}" for setting, choice in summary.choices.items()],
                f"registered:        {_registration(reg)}",
                *([f"train/serve parity: {reg.parity}"] if reg.parity else []),
                f"{'predictions:' if config.has_head else 'sample answers:':<19}{summary.samples_path}",
                f"try it:            loraflow predict models:/{reg.model_name}/{reg.version} --text '...'"
                if config.has_head else f"chat with it:      loraflow chat models:/{reg.model_name}/{reg.version}",
                "look at the run:   make ui   (then open http://127.0.0.1:5000)",
            ]
        )
    )
    if not reg.decided:
        print(f"loraflow: {reg.model_name} version {reg.version} not judged for promotion: {reg.reason}",
              file=sys.stderr)
        return EXIT_UNDECIDED
    return 0


def _registration(reg) -> str:
    """A RegisterResult in one line: the version, whether it became champion, and why."""
    outcome = " -> champion" if reg.promoted else " (awaiting approval)" if reg.awaiting_approval else " (not promoted)"
    return f"{reg.model_name} version {reg.version}{outcome}: {reg.reason}"


def _sync(args: argparse.Namespace) -> int:
    from flows.runs import sync_run

    synced = sync_run(args.run_id, args.output_dir)
    print(f"run {synced.run_id}: sent " + ", ".join(f"{count} {op}" for op, count in synced.applied.items()))
    if synced.torn:
        print(f"skipped {synced.torn} torn line(s) of the record (a crash while writing it)", file=sys.stderr)
    if synced.registered is not None:
        print(f"registered: {_registration(synced.registered)}")
        if synced.registered.awaiting_approval:
            name, version = synced.registered.model_name, synced.registered.version
            print(f"decide: loraflow approve {name} {version}, or loraflow reject {name} {version} --reason '...'")
        if not synced.registered.decided:
            return EXIT_UNDECIDED
    return 0


def _clean_outputs(args: argparse.Namespace) -> int:
    import shutil

    from flows.runs import unsynced_runs

    if not args.output_dir.exists():
        print(f"{args.output_dir}: nothing to delete")
        return 0
    unsynced = unsynced_runs(args.output_dir)
    if unsynced:
        raise UserError(f"{args.output_dir}: not deleted: {len(unsynced)} run(s) kept records their tracking server "
                        f"never got ({', '.join(path.name for path in unsynced)}); `loraflow sync RUN_ID` them first")
    shutil.rmtree(args.output_dir)
    print(f"{args.output_dir}: deleted")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json

    from conf.schema import load_sweep

    sweep_config = load_sweep(args.sweep)
    if args.override:
        sweep_config = sweep_config.model_copy(update={"overrides": [*sweep_config.overrides, *args.override]})
    if args.pool:
        from conf.schema import SweepRunner

        runner = sweep_config.runner or SweepRunner(pool=args.pool)
        sweep_config = sweep_config.model_copy(update={"runner": runner.model_copy(update={"pool": args.pool}),
                                                       "max_concurrency": 1})
    if sweep_config.runner is not None and "PREFECT_API_URL" not in os.environ:
        raise UserError(f"{args.sweep}: points on work pool {sweep_config.runner.pool} need the Prefect server its "
                        "workers poll: set PREFECT_API_URL")
    wait_for_prefect = start_in_background()
    from flows.sweep import run_sweep

    summary = run_sweep(sweep_config, wait_for_prefect)
    print(f"\nsweep run:  {summary.run_id} (store {shown_uri(os.environ['MLFLOW_TRACKING_URI'])})")
    for result in summary.results:
        scores = ", ".join(f"{key.removeprefix('tuned_')} {value:.4f}" for key, value in result.metrics.items()
                           if key.startswith("tuned_"))
        print(f"  {result.status:<8} {result.run_id}  {json.dumps(result.point)}  {scores or result.error}")
    if summary.best is not None:
        print(f"best:       {json.dumps(summary.best.point)} (run {summary.best.run_id})")
        print(f"registered: {_registration(summary.registered)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.override)
    if args.trust_remote_code:
        config = config.model_copy(update={"trust_remote_code": True})
    wait_for_prefect = start_in_background()
    from flows.evaluate_model import evaluate_model, preflight_evaluation

    preflight_evaluation(config)
    wait_for_prefect()
    summary = evaluate_model(config, args.model)
    print(f"\nMLflow run:        {summary.run_id} (experiment {config.experiment}, store {shown_uri(os.environ['MLFLOW_TRACKING_URI'])})")
    for name, value in sorted(summary.metrics.items()):
        print(f"{name + ':':<19}{value:.4f}")
    print(f"answers:           {summary.samples_path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from tasks.register import list_versions

    rows = list_versions(args.name)
    print(f"{'version':>7}  {'created':<16}  {'metric':<16} {'value':>9}  {'aliases':<20}  promotion")
    for row in rows:
        value = f"{row.value:.4f}" if row.value is not None else "-"
        print(f"{row.version:>7}  {row.created:<16}  {row.metric or '-':<16} {value:>9}  "
              f"{','.join(row.aliases) or '-':<20}  {row.promotion}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flows.promotion import shared_lock
    from tasks.register import promote

    if args.force and not args.reason:
        raise UserError("--force needs --reason '...': the reason is recorded on the version")
    decision = promote(args.name, args.version, force=args.force, reason=args.reason or "",
                       across_machines=shared_lock())
    print(f"{args.name} version {args.version}: " + ("champion; " if decision.promote else "") + decision.reason)
    return 0


def _decide(args: argparse.Namespace) -> int:
    from flows.approval import answer_approval

    approve = args.command == "approve"
    if not approve and not args.reason:
        raise UserError("reject needs --reason '...': the reason is recorded on the version")
    print(f"{args.name} version {args.version}: {answer_approval(args.name, args.version, approve, args.reason or '')}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from flows.promotion import shared_lock
    from tasks.register import rollback

    demoted, restored = rollback(args.name, shared_lock())
    print(f"{args.name}: champion moved back from version {demoted} to version {restored}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal

    config = load_config(args.config, args.override)  # a bad recipe stops here, not at 2 a.m.
    os.environ[CONSOLE_LOG_LEVEL["prefect"]] = "INFO"  # a served schedule's log is its console: each night's outcome
    server = None
    if os.environ.get("PREFECT_API_URL"):
        print(f"loraflow: scheduling on the Prefect server at {os.environ['PREFECT_API_URL']}", flush=True)
    else:
        from flows.prefect_server import start_server, stop_server

        server = start_server(args.prefect_port)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{args.prefect_port}/api"
        print(f"loraflow: started a Prefect server on http://127.0.0.1:{args.prefect_port} (its UI too); "
              "it stops with this command", flush=True)
    from prefect.deployments.runner import EntrypointType

    from flows.nightly import nightly

    # SIGTERM (systemd, Kubernetes, kill) stops serving as Ctrl-C does, at once.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        nightly.serve(
            name=args.name or f"{config.name}-nightly", cron=args.cron,
            parameters={"recipe": str(args.config.resolve()), "overrides": args.override, "force": False},
            entrypoint_type=EntrypointType.MODULE_PATH, print_starting_message=True,
        )
    except KeyboardInterrupt:
        print("loraflow: serving stopped", file=sys.stderr)
    finally:
        if server is not None:
            stop_server(server)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tasks.base_model import TRUST_REMOTE_CODE_ENV
    from tasks.deploy import API_KEY_ENV, AliasFollower, ServerLimits, check_exposure, deploy

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key, args.insecure)
    os.environ[TRUST_REMOTE_CODE_ENV] = "1" if args.trust_remote_code else "0"
    if args.engine == "vllm":
        from tasks.vllm_engine import check_vllm_runs

        check_vllm_runs()
    try:
        task = _logged_task(f"models:/{args.name}@{args.alias}")
    except UserError:
        task = "causal_lm"  # not readable yet: deploy says why below, and keeps trying
    if task != "causal_lm":
        raise UserError(f"{args.name}@{args.alias}: a {task.replace('_', ' ')} model; loraflow deploy serves chat "
                        f"models. Serve its pyfunc (labels) with: mlflow models serve -m models:/{args.name}@{args.alias}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    follower = AliasFollower(args.name, args.alias, engine=args.engine)
    try:
        deployment = deploy(follower, args.host, args.port, args.poll_seconds, ServerLimits(
            args.max_concurrent, args.max_queue, args.timeout_seconds, args.max_tokens_limit), api_key)
    except LookupError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from None
    print(f"loraflow: serving {args.name}@{args.alias} (version {follower.live.version}) on {deployment.url}: "
          "POST /v1/chat/completions, GET /v1/models, POST /invocations, GET /health, GET /metrics"
          + ("" if api_key else " (no API key)") + "; Ctrl-C stops it", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    deployment.stop()
    print("loraflow: serving stopped", file=sys.stderr)
    return 0


def _data(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile

    from conf.schema import DataConfig
    from tasks.clean import clean
    from tasks.context import RunContext

    from conf.schema import RunConfig, TrainConfig

    data = DataConfig(train=[str(p) for p in args.paths], eval=[], format=args.format, text_split=args.text_split)
    kind = RunConfig(train=TrainConfig(objective=args.objective)).data_kind  # what a recipe with that objective keeps
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="loraflow-data-"))
    try:
        result = clean(data, RunContext(out_dir), task=kind)
    except BaseException:
        if not args.out:  # a folder of ours, left empty by what failed
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    report = json.loads(result.report_path.read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps(report["sources"]))
        return 0
    for source, counts in report["sources"].items():
        rejected = ", ".join(f"{reason} {n}" for reason, n in counts["rejected"].items()) or "none"
        print(f"{source}: {counts['format']}, read {counts['read']}, kept {counts['kept']}, rejected: {rejected}")
        if "layout" in counts:
            print(f"  {counts['layout']}")
        for layout, rows in counts.get("layouts", {}).items():
            print(f"  {layout}: {rows} rows")
        for key, what in (("reasoning_rows", "rows with reasoning"), ("untrained_turns", "turns not trained (weight 0)")):
            if counts.get(key):
                print(f"  {what}: {counts[key]}")
    first_origin = {}
    for line in result.rejects_path.read_text(encoding="utf-8").splitlines():
        reject = json.loads(line)
        first_origin.setdefault(reject["reason"], reject["origin"])
    for reason, hint in report["hints"].items():
        print(f"hint: {reason} (first at {first_origin[reason]}): {hint}")
    print(f"kept rows: {result.train_path}\nrejects:   {result.rejects_path}\nreport:    {result.report_path}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    """Prepares the data in a scratch folder that goes when the samples are printed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="loraflow-preview-") as scratch:
        return _print_preview(args, Path(scratch))


def _print_preview(args: argparse.Namespace, scratch: Path) -> int:
    import json
    import random
    from itertools import islice

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from flows.stages import prepare_data
    from tasks.base_model import resolve_base_model
    from tasks.context import RunContext
    from tasks.results import PREFERENCE_KINDS
    from tasks.tokenize import ChatEncoder, encode_chat_rows, head_sample_text, marked_text, padding_share

    config = load_config(args.config, args.override)
    ctx = RunContext(scratch, trust_remote_code=config.trust_remote_code)
    data = prepare_data(config, resolve_base_model(config.base_model), ctx)
    cleaned, tokens = data.cleaned, data.tokens
    tokenizer = AutoTokenizer.from_pretrained(tokens.tokenizer_dir)
    train_rows = load_from_disk(str(tokens.train_dir))
    if tokens.task in PREFERENCE_KINDS:
        return _print_preference_preview(args, config, tokens, tokenizer, train_rows)
    if config.tokenize.mode == "chat" and not config.has_head:
        clean_rows = (json.loads(line) for line in cleaned.train_path.read_text(encoding="utf-8").splitlines())
        encoded = encode_chat_rows(ChatEncoder(tokenizer, config.tokenize), clean_rows, {})
        samples = [sample for sample, _ in islice(encoded, args.n)]
    else:
        samples = list(train_rows.select(range(min(args.n, tokens.train_rows))))
    if args.json:
        for sample in samples:
            print(json.dumps({"input_ids": sample["input_ids"], "labels": sample["labels"]}))
        return 0
    for number, sample in enumerate(samples, start=1):
        if config.has_head:
            print(f"--- sample {number}: {len(sample['input_ids'])} tokens ---")
            print(head_sample_text(tokenizer, sample, tokens.labels))
            continue
        trained = sum(label != -100 for label in sample["labels"])
        print(f"--- sample {number}: {len(sample['input_ids'])} tokens, {trained} trained (between [[ ]]) ---")
        print(marked_text(tokenizer, sample["input_ids"], sample["labels"]))
    packed = "seq_lengths" in train_rows.column_names
    lengths = [n for row in train_rows["seq_lengths"] for n in row] if packed else [len(r) for r in train_rows["input_ids"]]
    print(f"--- {tokens.train_samples} train samples, {tokens.train_tokens} tokens, in {tokens.train_rows} rows "
          f"of up to {config.tokenize.max_length}; rejected {tokens.rejected or 'none'}, truncated {tokens.truncated}")
    waste = padding_share(random.Random(0).sample(lengths, len(lengths)), config.train.batch_size)
    print(f"--- padding: {waste:.0%} of tokens in shuffled batches of {config.train.batch_size} without packing; "
          + ("0% with packing (rows are flattened, no padding)" if packed else "packing is off"))
    return 0


def _print_preference_preview(args: argparse.Namespace, config, tokens, tokenizer, train_rows) -> int:
    """Preference samples as they will be trained: each answer after its prompt, the answer between [[ ]]."""
    import json

    from tasks.tokenize import marked_text

    answers = [name for name in ("chosen_ids", "rejected_ids", "completion_ids") if name in train_rows.column_names]
    samples = list(train_rows.select(range(min(args.n, len(train_rows)))))
    if args.json:
        for sample in samples:
            print(json.dumps({key: sample[key] for key in ("prompt_ids", *answers, "label") if key in sample}))
        return 0
    for number, sample in enumerate(samples, start=1):
        prompt = sample["prompt_ids"]
        label = f", labelled {'desirable' if sample['label'] else 'undesirable'}" if "label" in sample else ""
        print(f"--- sample {number}: a prompt of {len(prompt)} tokens{label} ---")
        for name in answers:
            answer = sample[name]
            print(f"{name.removesuffix('_ids')} ({len(answer)} tokens, between [[ ]]):")
            print(marked_text(tokenizer, prompt + answer, [-100] * len(prompt) + answer))
    print(f"--- {tokens.train_samples} train samples, {tokens.train_tokens} tokens, each prompt and answer within "
          f"{config.tokenize.max_length}; rejected {tokens.rejected or 'none'}, truncated {tokens.truncated}")
    return 0


def _logged_task(uri: str) -> str:
    """What a logged loraflow model does (causal_lm, or a task head), read from its MLflow model config."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        flavor = mlflow.models.get_model_info(uri).flavors.get("python_function", {})
    except (MlflowException, OSError) as error:
        raise UserError(f"{uri}: cannot load model ({str(error).splitlines()[0]})") from None
    return flavor.get("config", {}).get("task", "causal_lm")


def _predict(args: argparse.Namespace) -> int:
    import json

    import mlflow

    from tasks.base_model import TRUST_REMOTE_CODE_ENV

    task = _logged_task(args.model)
    if task == "causal_lm":
        raise UserError(f"{args.model}: a chat model, which answers rather than labels: loraflow chat {args.model}")
    os.environ[TRUST_REMOTE_CODE_ENV] = "1" if args.trust_remote_code else "0"
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    predictions = mlflow.pyfunc.load_model(args.model).predict(texts)
    for text, prediction in zip(texts, predictions):
        if args.json:
            print(json.dumps({"text": text, "prediction": prediction}, ensure_ascii=False))
        elif task == "sequence_classification":
            print(f"{prediction['label']}\t{prediction['score']:.3f}\t{text}")
        else:
            print(text)
            for entity in prediction or [{"entity": "(no entities)", "text": "", "start": 0, "end": 0, "score": 0}]:
                print(f"  {entity['entity']}\t{entity['text']}\t[{entity['start']}:{entity['end']}]\t"
                      f"{entity['score']:.3f}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.base_model import TRUST_REMOTE_CODE_ENV

    task = _logged_task(args.model)
    if task != "causal_lm":
        raise UserError(f"{args.model}: not a chat model but a {task.replace('_', ' ')} head; it labels text: "
                        f"loraflow predict {args.model} --text '...'")
    os.environ[TRUST_REMOTE_CODE_ENV] = "1" if args.trust_remote_code else "0"
    try:
        model = mlflow.pyfunc.load_model(args.model, model_config={"max_new_tokens": args.max_new_tokens})
    except (MlflowException, OSError) as error:
        raise UserError(f"{args.model}: cannot load model ({str(error).splitlines()[0]})") from None
    def say(prompt: str) -> None:
        """The model's answer to one prompt, after its reasoning (if it reasoned)."""
        completion = model.predict({"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_new_tokens})
        message = completion["choices"][0]["message"]
        if message.get("reasoning_content"):
            print(f"(reasoning) {message['reasoning_content']}")
        print(message["content"], flush=True)

    if args.prompt:
        for prompt in args.prompt:
            say(prompt)
        return 0
    print("Type a message; an empty line or Ctrl-D ends the chat.")
    for line in sys.stdin:
        if not line.strip():
            break
        say(line.strip())
    return 0


def _export(args: argparse.Namespace) -> int:
    from tasks.export import export_merged

    print(f"merged model: {export_merged(args.model, args.merged, args.trust_remote_code)}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store {shown_uri(uri)}); Ctrl-C stops it.", flush=True)
    os.execv(command[0], command)


def _prefect_ui(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"Prefect server and UI on http://127.0.0.1:{args.port} (state in {os.environ['PREFECT_HOME']}); "
          "Ctrl-C stops it. For commands to use it: export PREFECT_API_URL=http://127.0.0.1:"
          f"{args.port}/api", flush=True)
    os.execv(command[0], command)


TRUST_HELP = "run Python code shipped with the model (never taken from the logged model itself)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description="Fine-tune chat models with LoRA, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe end to end: clean, tokenize, train, evaluate, register")
    run.add_argument("config", type=Path, help="recipe YAML, e.g. conf/identity_sft.yaml")
    run.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. -o train.max_steps=10 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="continue the newest cut-off run of this exact recipe from its last checkpoint, if any")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue even though the data changed since the checkpoint (recorded)")
    run.set_defaults(handler=_run)

    again = commands.add_parser("rerun", help="run again from a run's logged recipe, as a new run tagged with its origin")
    again.add_argument("run_id", help="the MLflow run id to repeat")
    again.set_defaults(handler=_rerun)

    syncing = commands.add_parser("sync", help="send what a run kept while its tracking server was away, and register it")
    syncing.add_argument("run_id", help="the run, as `loraflow run` printed it")
    syncing.add_argument("--output-dir", type=Path, default=RunConfig.model_fields["output_dir"].default,
                         help="the recipe's output_dir (default: outputs)")
    syncing.set_defaults(handler=_sync)

    serving = commands.add_parser("serve", help="serve the recipe as a Prefect deployment on a cron schedule (nightly)")
    serving.add_argument("config", type=Path, help="recipe YAML, re-read at every run")
    serving.add_argument("--cron", default="0 2 * * *", help="when to run (cron, the server's time zone; default 02:00)")
    serving.add_argument("--name", help="deployment name (default: <recipe name>-nightly)")
    serving.add_argument("--prefect-port", type=int, default=4200,
                         help="port of the Prefect server started when PREFECT_API_URL is not set (default 4200)")
    serving.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    serving.set_defaults(handler=_serve)

    sweeping = commands.add_parser("sweep", help="train a recipe over a grid, random or TPE search of keys (one parent run)")
    sweeping.add_argument("sweep", type=Path, help="sweep YAML, e.g. conf/sweep_identity.yaml")
    sweeping.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                          help="a recipe key for every point, e.g. -o train.max_steps=10 (repeatable)")
    sweeping.add_argument("--pool", metavar="NAME", help="run the points as flow runs of deployment sweep-point/NAME on "
                          "that Prefect work pool (PREFECT_API_URL: the team's server)")
    sweeping.set_defaults(handler=_sweep)

    evaluation = commands.add_parser("eval", help="score one model on a recipe's held-out data, as its own MLflow run")
    evaluation.add_argument("config", type=Path, help="recipe YAML: its data, tokenize and evaluate sections are used")
    evaluation.add_argument("--model", required=True,
                            help="a hub id, a model folder, pip:<package>, a run id, runs:/<id>/adapter or models:/name@alias")
    evaluation.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    evaluation.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    evaluation.set_defaults(handler=_eval)

    models = commands.add_parser("models", help="list a registered model's versions, metrics and aliases")
    models.add_argument("name", help="registered model name, e.g. loraflow-identity")
    models.set_defaults(handler=_models)

    promotion = commands.add_parser("promote", help="make a version the champion, if it passes its promotion rule")
    promotion.add_argument("name")
    promotion.add_argument("version")
    promotion.add_argument("--force", action="store_true", help="promote even if the rule says no (needs --reason)")
    promotion.add_argument("--reason", help="why it was forced; recorded on the version with who forced it")
    promotion.set_defaults(handler=_promote)

    for command, what in (("approve", "approve a version awaiting approval (registry.approval: manual): it becomes "
                                      "champion"),
                          ("reject", "reject a version awaiting approval: the champion stays")):
        deciding = commands.add_parser(command, help=what)
        deciding.add_argument("name")
        deciding.add_argument("version")
        deciding.add_argument("--reason", help="why; recorded on the version with who decided and when"
                              + (" (required)" if command == "reject" else ""))
        deciding.set_defaults(handler=_decide)

    back = commands.add_parser("rollback", help="move the champion back to the previous champion")
    back.add_argument("name")
    back.set_defaults(handler=_rollback)

    deploying = commands.add_parser("deploy", help="serve a registered model's alias over HTTP, following the alias")
    deploying.add_argument("name", help="registered model name, e.g. loraflow-identity")
    deploying.add_argument("--alias", default="champion", help="the alias to serve and follow (default champion)")
    deploying.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    deploying.add_argument("--port", type=int, default=8000)
    deploying.add_argument("--poll-seconds", type=float, default=10.0, help="how often the alias is read (default 10)")
    deploying.add_argument("--max-tokens-limit", type=int, default=512,
                           help="the largest max_tokens a request may ask for (default 512)")
    deploying.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                           help="what generates: transformers (default; CPU or GPU) or vllm (CUDA only; `make vllm` "
                                "installs it)")
    deploying.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: the LORAFLOW_API_KEY "
                           "variable; none: no key)")
    deploying.add_argument("--insecure", action="store_true", help="serve on a non-loopback --host without an API key")
    deploying.add_argument("--max-concurrent", type=int, default=16, help="requests answered at once (default 16)")
    deploying.add_argument("--max-queue", type=int, default=64,
                           help="requests waiting for a slot (default 64); past it: 429 with Retry-After")
    deploying.add_argument("--timeout-seconds", type=float, default=300.0,
                           help="a request not answered within this gets 503 with Retry-After (default 300)")
    deploying.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    deploying.set_defaults(handler=_deploy)

    data = commands.add_parser("data", help="run the clean stage alone on files and print its report")
    data.add_argument("paths", nargs="+", type=Path,
                      help="files or folders of .json/.jsonl/.parquet/.txt/.md(.gz) rows")
    data.add_argument("--format", default="auto",
                      choices=["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "text"])
    data.add_argument("--text-split", default="line", choices=["line", "paragraph", "file"],
                      help=".txt/.md files: a document per non-empty line (default), per paragraph, or per file")
    data.add_argument("--out", type=Path, help="work folder: the cleaned rows, rejects and report land in its clean/ (default: a temp folder)")
    data.add_argument("--json", action="store_true", help="print one JSON object: per file, format and counts")
    data.add_argument("--objective", default="sft", choices=["sft", "dpo", "kto", "orpo", "simpo"],
                      help="read the rows as a recipe with this train.objective does: preference pairs for dpo, orpo "
                      "and simpo, labelled answers (or pairs) for kto")
    data.set_defaults(handler=_data)

    node = commands.add_parser("train-node", help="join a multi-node training as one of its other machines")
    node.add_argument("config", type=Path, help="recipe YAML, the one the flow's machine runs")
    node.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                      help="as for run, e.g. -o train.nodes=2 -o train.rendezvous=node0:29400")
    node.set_defaults(handler=_train_node)

    preview = commands.add_parser("preview", help="show how a recipe's samples will be trained: text, trained spans, packing")
    preview.add_argument("config", type=Path, help="recipe YAML")
    preview.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    preview.add_argument("--json", action="store_true", help="one JSON object per sample: input_ids and labels (-100: no loss)")
    preview.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    preview.set_defaults(handler=_preview)

    chat = commands.add_parser("chat", help="chat with a registered or logged model")
    chat.add_argument("model", help="an MLflow model URI, e.g. models:/loraflow-identity@champion or runs:/<id>/adapter")
    chat.add_argument("-p", "--prompt", action="append", help="answer these prompts and exit (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=96)
    chat.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    chat.set_defaults(handler=_chat)

    predicting = commands.add_parser("predict", help="label texts with a registered task-head model (classes, or entities)")
    predicting.add_argument("model", help="an MLflow model URI, e.g. models:/loraflow-sentiment@champion")
    predicting.add_argument("--text", action="append", help="a text to label (repeatable); none: one text per stdin line")
    predicting.add_argument("--json", action="store_true", help="one JSON object per text: the text and its prediction")
    predicting.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    predicting.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="write a model as one merged Hugging Face folder (base + adapter)")
    export.add_argument("model", help="a run id, or an MLflow model URI such as models:/loraflow-identity@champion")
    export.add_argument("--merged", type=Path, required=True, metavar="OUT", help="the folder to write (new or empty)")
    export.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    export.set_defaults(handler=_export)

    cleaning = commands.add_parser("clean-outputs", help="delete the output folder, unless a run in it is not synced")
    cleaning.add_argument("--output-dir", type=Path, default=RunConfig.model_fields["output_dir"].default,
                          help="the recipes' output_dir (default: outputs)")
    cleaning.set_defaults(handler=_clean_outputs)

    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_ui)

    prefect_ui = commands.add_parser("prefect-ui", help="start a Prefect server and its UI on 127.0.0.1")
    prefect_ui.add_argument("--port", type=int, default=4200)
    prefect_ui.set_defaults(handler=_prefect_ui)
    verbose = "also print Prefect's and MLflow's INFO lines (each task run, system metrics)"
    parser.add_argument("--verbose", action="store_true", help=verbose)
    for command in commands.choices.values():  # after the command too: loraflow run CONFIG --verbose
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # before Prefect or MLflow is imported: both read their log level once
        os.environ.update(dict.fromkeys(CONSOLE_LOG_LEVEL.values(), "INFO"))
    try:
        return args.handler(args)
    except UserError as error:
        print(f"loraflow: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
