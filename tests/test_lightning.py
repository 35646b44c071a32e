"""The Lightning recipe (examples/lightning_recipe.py) against a plain PyTorch loop."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from torch.utils.data import DataLoader  # noqa: E402

from jdoptim import JDOptimizer  # noqa: E402
from jdoptim.aggregation import UPGrad  # noqa: E402

_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "lightning_recipe.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("lightning_recipe", _RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(tmp_path, max_steps):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_lightning_recipe_equals_a_plain_loop(tmp_path):
    recipe = _recipe()
    torch.manual_seed(0)
    module = recipe.MultiTaskModule(lr=1e-2)
    plain = copy.deepcopy(module)
    data = recipe.make_data(samples=96)
    steps = 7

    trainer = _trainer(tmp_path, steps)
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=False))

    # The same training by hand: JDOptimizer(Adam) + StepLR(5, 0.5), one scheduler step per step.
    opt = JDOptimizer(torch.optim.Adam(plain.parameters(), lr=1e-2), UPGrad())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    batches = list(DataLoader(data, batch_size=32, shuffle=False))
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        opt.step(plain.task_losses(x, y))
        scheduler.step()

    assert trainer.global_step == steps
    lightning_opt = module.optimizers(use_pl_optimizer=False)
    assert isinstance(lightning_opt, JDOptimizer)
    assert lightning_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    for p, q in zip(module.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q)
    record = lightning_opt.last_record
    assert record is not None and record.weights is not None and record.names == ("task0", "task1")


def test_lightning_checkpoint_holds_the_jd_state(tmp_path):
    recipe = _recipe()
    module = recipe.MultiTaskModule()
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, DataLoader(recipe.make_data(samples=64), batch_size=32))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert "jdoptim" in optimizer_state and "state" in optimizer_state
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 2
