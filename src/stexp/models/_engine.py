"""The training engine: Lightning, set up the same way for every neural model in stexp.

Models write a ``lightning.LightningModule`` (its ``training_step`` logs ``"train_loss"`` and, when
validation data are given, ``validation_step`` logs ``"val_loss"``) and call :func:`train`. The engine
chooses the accelerator (CUDA when available; all visible GPUs with DDP), mixed precision on GPU,
progress bars by ``stexp.settings.verbosity``, seeding and determinism, early stopping on the
validation loss, and returns the per-epoch history.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from stexp._settings import logger, settings


def accelerator_for(device: str | None) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a torch device string (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    device = settings.resolve_device(device)
    if device.startswith("cuda"):
        if ":" in device:
            return "gpu", [int(device.split(":")[1])]
        return "gpu", "auto"
    if device == "mps":
        return "mps", 1
    return "cpu", 1


def make_loader(
    dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn=None,
):
    """A DataLoader with a seeded generator, so shuffling is reproducible."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )


class _History:
    """Collects the epoch-level metrics Lightning logged."""

    def __new__(cls):
        import lightning as L

        class HistoryCallback(L.Callback):
            def __init__(self) -> None:
                self.history: dict[str, list[float]] = {}

            def _collect(self, trainer) -> None:
                for key, value in trainer.callback_metrics.items():
                    if key.endswith("_step"):
                        continue
                    self.history.setdefault(key.removesuffix("_epoch"), []).append(float(value))

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                if not trainer.sanity_checking:
                    self._collect(trainer)

        return HistoryCallback()


def train_with_hparams(module, train_loader, val_loader, hparams: dict[str, Any]) -> dict[str, list[float]]:
    """:func:`train` with its options from a model's hyper-parameters.

    Reads ``max_epochs``, ``device``, ``seed`` and ``early_stopping_patience`` from ``hparams``.
    """
    return train(
        module,
        train_loader,
        val_loader,
        max_epochs=int(hparams["max_epochs"]),
        device=hparams["device"],
        seed=int(hparams["seed"]),
        early_stopping_patience=int(hparams["early_stopping_patience"]) or None,
    )


def _epoch_progress_bar():
    """A Lightning progress bar with one tqdm bar per fit that advances per epoch and shows the losses.

    Lightning's own bars redraw every step of every epoch: on cached features an epoch takes a
    fraction of a second, and a notebook fills with hundreds of lines.
    """
    import lightning as L

    class EpochProgressBar(L.pytorch.callbacks.ProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self._enabled = True
            self.bar = None

        def disable(self) -> None:
            self._enabled = False

        def enable(self) -> None:
            self._enabled = True

        def on_train_start(self, trainer, pl_module) -> None:
            if self._enabled:
                from tqdm.auto import tqdm

                name = type(getattr(pl_module, "net", pl_module)).__name__.removesuffix("Network")
                self.bar = tqdm(
                    total=trainer.max_epochs, desc=f"train {name}", unit="epoch", leave=False, mininterval=1.0
                )

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.bar is not None:
                metrics = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k.endswith("_loss")}
                self.bar.set_postfix(metrics, refresh=False)
                self.bar.update(1)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return EpochProgressBar()


def train(
    module,
    train_loader,
    val_loader=None,
    *,
    max_epochs: int,
    device: str | None = "auto",
    seed: int = 0,
    precision: str | None = None,
    early_stopping_patience: int | None = None,
    gradient_clip_val: float | None = None,
) -> dict[str, list[float]]:
    """Fit a LightningModule and return its per-epoch history (``{"train_loss": [...], ...}``).

    Parameters
    ----------
    module
        The LightningModule.
    train_loader, val_loader
        DataLoaders; with ``val_loader`` the module must log ``"val_loss"``.
    max_epochs
        Number of epochs (fewer with early stopping).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    seed
        Seeds python, numpy and torch; CPU runs are deterministic for a seed.
    precision
        Lightning precision; default ``"bf16-mixed"`` on GPUs that support it, else ``"32-true"``.
    early_stopping_patience
        Stop when ``val_loss`` has not improved for this many epochs (needs ``val_loader``).
    gradient_clip_val
        Clip gradients to this norm.
    """
    import lightning as L
    import torch

    accelerator, devices = accelerator_for(device)
    if precision is None:
        precision = "bf16-mixed" if accelerator == "gpu" and torch.cuda.is_bf16_supported() else "32-true"
    L.seed_everything(int(seed), workers=True, verbose=False)
    history = _History()
    callbacks = [history]
    if val_loader is not None and early_stopping_patience:
        callbacks.append(L.pytorch.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience))
    if settings.show_progress:  # one tqdm bar over epochs, like stexp's own bars
        callbacks.append(_epoch_progress_bar())
    if accelerator == "cpu":
        torch.set_num_threads(max(1, settings.num_workers))
    strategy = "auto"
    if accelerator == "gpu" and devices == "auto" and torch.cuda.device_count() > 1:
        strategy = "ddp"
    # Lightning's banners ("GPU available...", tips) are printed while the Trainer is built: quiet them first.
    lightning_loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    lightning_loggers += [
        logging.getLogger(f"{n}.utilities.rank_zero") for n in ("lightning.pytorch", "lightning.fabric")
    ]
    levels = [lg.level for lg in lightning_loggers]
    for lg in lightning_loggers:
        lg.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(
            max_epochs=int(max_epochs),
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            deterministic=accelerator == "cpu",
            callbacks=callbacks,
            enable_progress_bar=settings.show_progress,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            gradient_clip_val=gradient_clip_val,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            # Lightning's own use of a torch API that torch deprecated: nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    finally:
        for lg, level in zip(lightning_loggers, levels, strict=True):
            lg.setLevel(level)
    out = history.history
    logger.debug(f"trained {trainer.current_epoch} epochs on {accelerator}, precision {precision}")
    return out
