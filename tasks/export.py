"""Export a logged or registered model as one merged Hugging Face folder: loads with
`AutoModelForCausalLM.from_pretrained`, no PEFT and no MLflow needed, and generates what base + adapter does.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from transformers import AutoTokenizer

from conf.schema import UserError
from tasks.base_model import load_tuned_model
from tasks.model_card import CARD_FILE, merged_card, write_card
from tasks.logged_model import fetch_model, is_logged_model


def export_merged(source: str, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Write the tuned model (adapter merged into its base) with its tokenizer to `out_dir`, all or nothing; the
    model's own code runs only with `trust_remote_code` from the user."""
    if not is_logged_model(source):
        raise UserError(f"{source}: not a logged model (a run id, runs:/<id>/adapter or models:/name@alias)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: already exists and is not empty; name a new folder")
    with tempfile.TemporaryDirectory(prefix="loraflow-export-") as scratch:
        tuned = fetch_model(source, Path(scratch) / "model", trust_remote_code)
        model = load_tuned_model(tuned.model_dir, tuned.weights_dir, tuned.trust_remote_code)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        staging = Path(scratch) / "merged"
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(tuned.weights_dir, trust_remote_code=tuned.trust_remote_code).save_pretrained(staging)
        if (card := tuned.weights_dir / CARD_FILE).is_file():
            write_card(merged_card(card), staging)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staging), out_dir)
    return out_dir
