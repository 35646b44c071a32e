"""Jacobian descent in PyTorch Lightning: manual optimisation with a JDOptimizer.

Lightning's automatic optimisation calls ``loss.backward()`` on one loss, so a JD step needs
manual optimisation: ``self.automatic_optimization = False``, then in ``training_step`` give the
losses to the optimizer through a closure. Going through ``self.optimizers()`` (Lightning's
wrapper) keeps ``trainer.global_step``, ``max_steps``, precision plugins and checkpoints working.
The scheduler returned by ``configure_optimizers`` is stepped by hand, as always in manual mode.

Run: ``python examples/lightning_recipe.py`` (needs ``pip install lightning``).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


class MultiTaskModule(L.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.automatic_optimization = False  # JD steps are manual steps
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(2))

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {
            f"task{i}": (head(features).squeeze(1) - y[:, i]).pow(2).mean()
            for i, head in enumerate(self.heads)
        }

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        losses = self.task_losses(*batch)
        opt = self.optimizers()  # Lightning's wrapper around the JDOptimizer
        opt.zero_grad()
        opt.step(closure=lambda: losses)  # the JD step: JDOptimizer.step(closure=...)
        record = opt.optimizer.last_record  # the JDOptimizer's StepRecord
        self.log_dict({f"train/{name}": loss.detach() for name, loss in losses.items()})
        self.log("train/conflicting_pairs", float(record.conflicting_pairs or 0))
        self.lr_schedulers().step()  # manual optimisation: step the scheduler yourself

    def configure_optimizers(self):
        opt = JDOptimizer(torch.optim.Adam(self.parameters(), lr=self.lr), UPGrad())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": scheduler}


def make_data(samples: int = 256, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator)
    y = torch.stack([x[:, :4].sum(1), -x[:, 2:6].sum(1)], dim=1)
    return TensorDataset(x, y)


def main(max_steps: int = 20) -> MultiTaskModule:
    torch.manual_seed(0)
    module = MultiTaskModule()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=32, shuffle=True))
    print(f"{trainer.global_step} steps, lr now {module.optimizers().param_groups[0]['lr']:g}")
    return module


if __name__ == "__main__":
    main()
