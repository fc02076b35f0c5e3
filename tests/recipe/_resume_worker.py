"""Subprocess body for the resume-after-SIGKILL test: train the toy, save the LoRA.

Usage: python _resume_worker.py OUTPUT_DIR RESULT_FILE {fresh,resume} SLEEP_S
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file
from transformers import TrainerCallback

from mixtune.recipe import RunSettings
from tests.recipe.recipes import resume_recipe
from tests.recipe.toy import ToyCorpus, toy_adapted


class Sleep(TrainerCallback):
    """Slows steps down so the parent can kill the run mid-training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)


def main() -> None:
    out, result, mode, sleep = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    run = RunSettings(output_dir=out, progress=False, callbacks=(Sleep(sleep),) if sleep else ())
    res = resume_recipe(run).fit(toy_adapted(), ToyCorpus(), resume=mode == "resume")
    save_file(res.model.lora_state_dict(), result)


if __name__ == "__main__":
    main()
