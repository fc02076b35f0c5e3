"""Recipes shared by the recipe tests and their subprocess worker."""

from __future__ import annotations

from mixtune.recipe import Recipe, RunSettings


def resume_recipe(run: RunSettings) -> Recipe:
    # 16 train rows, batch 2 × accumulation 2: 4 steps an epoch, so 8 steps
    # cross an epoch boundary (data order re-drawn) after the kill point.
    return Recipe(
        max_steps=8,
        batch_size=2,
        grad_accum=2,
        learning_rate=5e-3,
        warmup=2,
        eval_steps=3,
        save_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
        layout="padded",
        run=run,
    )
