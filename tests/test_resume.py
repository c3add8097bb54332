"""Checkpoints and resume: a training process killed (kill -9) or stopped (SIGTERM) mid-way, then resumed, ends
with the same losses and the same adapter as a run that was never interrupted. Answering sample prompts during
training (evaluate.every_steps) leaves training as it was, too."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pydantic import TypeAdapter

from conf.schema import TrainConfig
from tasks.context import RunContext
from tasks.generation import SamplePrompts
from tasks.results import TokenizedData
from tasks.train import checkpoints_folder, resumable_checkpoint, train

ROWS = [{"messages": [{"role": "user", "content": f"Question {n}: who are you?"},
                      {"role": "assistant", "content": f"I am Ember ({n}), made by the loraflow team."}]}
        for n in range(24)]
CONFIG = TrainConfig(max_steps=5, batch_size=2, warmup_steps=1, checkpoint_every=2, learning_rate=2e-3)

# A training process as a user's would be: it takes SIGTERM as a request to checkpoint and stop.
CHILD = """
import json, sys
from pathlib import Path
from pydantic import TypeAdapter
from conf.schema import TrainConfig
from tasks.context import RunContext
from tasks.results import TokenizedData
from tasks.train import TrainingStopped, stop_on_sigterm, train
spec = json.loads(sys.argv[1])
with stop_on_sigterm():
    try:
        train(TypeAdapter(TokenizedData).validate_python(spec["tokens"]), spec["tiny_model_dir"],
              TrainConfig.model_validate(spec["config"]), RunContext(Path(spec["work_dir"])),
              on_step=lambda step, metrics: print("step", step, flush=True))
    except TrainingStopped as stopped:
        print("stopped", stopped.step, flush=True)
"""


@pytest.fixture(scope="module")
def tokens(tokenize_rows):
    return tokenize_rows(ROWS, max_length=64)


def run(tokens, tiny_model_dir, work_dir, losses, resume_from=None, samples=None, on_samples=lambda step, rows: None):
    return train(tokens, tiny_model_dir, CONFIG, RunContext(work_dir), resume_from=resume_from, samples=samples,
                 on_step=lambda step, metrics: losses.__setitem__(step, metrics["train_loss"]), on_samples=on_samples)


@pytest.fixture(scope="module")
def uninterrupted(tokens, tiny_model_dir, tmp_path_factory):
    losses = {}
    result = run(tokens, tiny_model_dir, tmp_path_factory.mktemp("uninterrupted"), losses)
    return losses, load_file(result.weights_dir / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_an_interrupted_run_resumes_to_the_same_adapter(how, tokens, tiny_model_dir, uninterrupted, tmp_path):
    spec = {"tokens": TypeAdapter(TokenizedData).dump_python(tokens, mode="json"), "tiny_model_dir": tiny_model_dir,
            "config": CONFIG.model_dump(mode="json"), "work_dir": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == "step 3":  # checkpoint-2 is complete; checkpoint-4 is not begun
            child.send_signal(how)
            break
    rest = child.stdout.read()
    assert child.wait(timeout=120) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    if how == signal.SIGTERM:
        stopped_at = int(rest.split("stopped ")[1])
        assert stopped_at in (3, 4)  # the step running when the signal came, finished and checkpointed
        assert resumable_checkpoint(checkpoints_folder(tmp_path / "train")).name == f"checkpoint-{stopped_at}"
    else:
        assert resumable_checkpoint(checkpoints_folder(tmp_path / "train")).name == "checkpoint-2"
    checkpoint = resumable_checkpoint(checkpoints_folder(tmp_path / "train"))

    losses = {}
    result = run(tokens, tiny_model_dir, tmp_path, losses, resume_from=checkpoint)
    expected_losses, expected_adapter = uninterrupted
    first = int(checkpoint.name.split("-")[1]) + 1
    assert sorted(losses) == list(range(first, 6))  # only the steps after the checkpoint ran again
    assert losses == pytest.approx({step: expected_losses[step] for step in losses}, rel=1e-4)
    adapter = load_file(result.weights_dir / "adapter_model.safetensors")
    assert adapter.keys() == expected_adapter.keys()
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, expected_adapter[name], rtol=1e-4, atol=1e-6)


def test_a_checkpoint_cut_off_mid_save_is_skipped(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert resumable_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()



@pytest.mark.slow
def test_answering_sample_prompts_while_training_changes_nothing_in_training(tokens, tiny_model_dir, uninterrupted, tmp_path):
    prompts = [[{"role": "user", "content": "Question 99: who are you?"}], [{"role": "user", "content": "Hi!"}]]
    samples = SamplePrompts(prompts, ["Question 99: who are you?", "Hi!"], chat=True, every_steps=2, max_new_tokens=12)
    answered, losses = {}, {}
    result = run(tokens, tiny_model_dir, tmp_path, losses, samples=samples,
                 on_samples=lambda step, rows: answered.__setitem__(step, rows))
    assert sorted(answered) == [2, 4]
    assert [row["prompt"] for row in answered[4]] == samples.shown and all(row["answer"] for row in answered[4])
    expected_losses, expected_adapter = uninterrupted
    assert losses == pytest.approx(expected_losses, rel=1e-4)
    adapter = load_file(result.weights_dir / "adapter_model.safetensors")
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, expected_adapter[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_stop_asked_during_the_last_step_still_stops_before_evaluation(tokens, tiny_model_dir, tmp_path):
    from tasks.train import STOP_REQUESTED, TrainingStopped, stop_on_sigterm

    def ask_to_stop_at_the_last_step(step, metrics):
        if step == CONFIG.max_steps:  # logged after the step's own stop check: only the end of training sees it
            STOP_REQUESTED.set()

    with stop_on_sigterm(), pytest.raises(TrainingStopped) as stopped:
        train(tokens, tiny_model_dir, CONFIG, RunContext(tmp_path), on_step=ask_to_stop_at_the_last_step)
    assert stopped.value.step == CONFIG.max_steps
    assert stopped.value.checkpoint == resumable_checkpoint(checkpoints_folder(tmp_path / "train"))  # resume finds it
    assert not (tmp_path / "train" / "adapter").exists()  # nothing saved for evaluation or registration
