"""The training engine: one Lightning ``TrainingPlan`` and one ``train`` function for every neural model.

A network (a ``torch.nn.Module``) only has to say what its losses are: ``network.losses(batch, data,
gather)`` returns a dict of named scalar losses for a batch, where ``batch`` is a dict with the
spot indices of the batch (``"index"``; and, when the image encoder is fine-tuned, the batch's patches
``"x"``), ``data`` the split's tensors (features, targets, graphs... kept on the device as buffers) and
``gather`` a function that collects a tensor from every process under DDP (identity on one device).
:class:`TrainingPlan` weights and sums the losses, logs them per epoch (``train_loss``, ``val_loss``,
and each named loss), builds the optimiser (AdamW; a fine-tuned image encoder ``network.image_encoder``
gets its own learning rate) and runs validation. :func:`train` chooses the accelerator (CUDA when
available), mixed precision on GPU, progress bars by ``stexp.settings.verbosity``, seeding and
determinism, early stopping on the validation loss, and returns the per-epoch history. It leaves the
caller's process as it found it (RNG states, threads, flags, environment).

Several devices (``devices=N``) train with Lightning DDP, one process per device (:func:`parallel_plan`):
``"ddp_notebook"`` (fork) inside Jupyter/IPython, ``"ddp_spawn"`` from a plain script, ``"ddp"`` when a
launcher started the processes (torchrun, SLURM ``srun``). With the fork/spawn launchers the trained
weights (rank 0's) and the history come back to the calling process. On CPU the processes talk over gloo.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from stexp._process import preserve_process_state
from stexp._settings import logger, settings


def launcher_layout() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` when a launcher (torchrun, SLURM ``srun``) started several processes, else ``None``.

    torchrun sets ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; ``srun`` sets ``SLURM_NTASKS``,
    ``SLURM_PROCID`` and ``SLURM_NNODES``. A SLURM allocation with one task (e.g. a notebook on a compute
    node) is not a launcher.
    """
    env = os.environ
    if "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        world = int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_WORLD_SIZE", world))
        return local, max(1, world // max(local, 1))
    if (
        int(env.get("SLURM_NTASKS", "1")) > 1
        and "SLURM_PROCID" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    ):
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        return max(1, world // max(nodes, 1)), nodes
    return None


def is_interactive() -> bool:
    """Running in Jupyter / IPython / a Python prompt, where processes must be forked, not spawned."""
    if hasattr(sys, "ps1") or bool(sys.flags.interactive):
        return True
    ipython = sys.modules.get("IPython")
    return bool(ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None)


def parallel_plan(device: str | None, devices: int | list[int] | None = None) -> dict[str, Any]:
    """How Lightning runs on ``device`` with ``devices``: ``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``world_size``.

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    devices
        ``None``: one device (the one ``device`` names), or the launcher's layout under torchrun / SLURM;
        ``N``: N GPUs (or N CPU processes with ``device="cpu"``); a list: those GPU indices.

    The strategy is ``"auto"`` for one process; for several: ``"ddp"`` under a launcher (torchrun,
    ``srun``), ``"ddp_notebook"`` (fork) in Jupyter/IPython, else ``"ddp_spawn"``.
    """
    device = settings.resolve_device(device)
    accelerator = "gpu" if device.startswith("cuda") else ("mps" if device == "mps" else "cpu")
    layout = launcher_layout()
    num_nodes = 1
    if devices is None:
        if layout is not None:
            devices, num_nodes = layout
        elif accelerator == "gpu" and ":" in device:
            devices = [int(device.split(":")[1])]
        else:
            devices = 1
    elif isinstance(devices, bool) or not isinstance(devices, (int, list, tuple)):
        raise ValueError(f"devices must be a positive integer or a list of GPU indices, got {devices!r}.")
    elif layout is not None:
        num_nodes = layout[1]
    if isinstance(devices, (list, tuple)):
        if accelerator != "gpu" or not devices or not all(isinstance(d, int) and d >= 0 for d in devices):
            raise ValueError(
                f"devices={devices!r}: a list names GPU indices (with device='cuda'); on {accelerator} pass a count."
            )
        devices, count = list(devices), len(devices)
    else:
        count = int(devices)
        if count < 1:
            raise ValueError(f"devices must be at least 1, got {devices!r}.")
    if accelerator == "mps" and count > 1:
        raise ValueError("device='mps' has one device; pass devices=1.")
    if accelerator == "gpu" and isinstance(devices, int) and layout is None:
        available = torch.cuda.device_count()
        if count > available:
            raise ValueError(f"devices={count} but {available} CUDA device(s) are visible.")
    world = count * num_nodes
    if world == 1:
        strategy = "auto"
    elif layout is not None:
        strategy = "ddp"
    elif is_interactive():
        strategy = "ddp_notebook"
        if accelerator == "gpu" and torch.cuda.is_initialized():
            raise RuntimeError(
                "fit(devices=...) in a notebook forks one process per GPU, which CUDA forbids once it is initialised "
                "in this process (e.g. by embed_images or predict on the GPU). Restart the kernel and train before "
                "any GPU work (embed_images loads cached features without the GPU), or run the training as a script "
                "(see the distributed-training docs)."
            )
    else:
        strategy = "ddp_spawn"
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
        "world_size": world,
    }


@contextlib.contextmanager
def _sharing_strategy(strategy: str | None):
    """Use torch.multiprocessing's tensor ``strategy`` for the block (``None``: leave it), then restore it.

    The spawn launcher pickles the module and its data to the workers; with the default ``file_descriptor``
    strategy the workers failed to map some of them here ("unable to resize file ... Invalid argument"),
    ``file_system`` works.
    """
    import torch.multiprocessing as tmp

    before = tmp.get_sharing_strategy()
    if strategy is None or strategy == before or strategy not in tmp.get_all_sharing_strategies():
        yield
        return
    tmp.set_sharing_strategy(strategy)
    try:
        yield
    finally:
        tmp.set_sharing_strategy(before)


def per_process_batch(n: int, batch_size: int, world_size: int) -> tuple[int, bool]:
    """``(batch size, drop_last)`` of one process's loader when ``n`` spots are split over ``world_size`` processes."""
    per_rank = math.ceil(n / max(int(world_size), 1))
    size = min(int(batch_size), per_rank)
    return size, per_rank > size


def index_batch(items) -> dict[str, torch.Tensor]:
    """``collate_fn`` of plain spot indices: ``{"index": (B,)}``."""
    return {"index": torch.as_tensor([int(i[0]) if isinstance(i, (tuple, list)) else int(i) for i in items])}


def index_loader(
    n: int,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn=None,
    order: torch.Tensor | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of spot indices ``0..n-1`` (in ``order`` when given) as ``{"index": ...}`` dicts by default.

    Shuffling draws from its own seeded generator, so it is reproducible and leaves torch's global RNG alone.
    """
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(n) if order is None else order),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn or index_batch,
    )


class TrainingPlan(L.LightningModule):
    """The LightningModule of every neural stexp model: losses from the network, AdamW, validation, logging.

    Parameters
    ----------
    network
        A module with ``losses(batch, data, gather) -> dict[str, Tensor]``; the plan holds it as ``net``.
    data
        Tensors per split (``{"train": {...}, "val": {...}}``), registered as non-persistent buffers so
        they move to the device with the module; ``network.losses`` gets the split's dict.
    lr, weight_decay
        AdamW settings.
    encoder_lr
        Learning rate of ``network.image_encoder`` when it is fine-tuned (``None``: ``lr``).
    loss_weights
        Weight of each named loss in the total (default 1 for a name not listed).
    """

    def __init__(
        self,
        network: nn.Module,
        data: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        lr: float,
        weight_decay: float,
        encoder_lr: float | None = None,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.net = network
        self.lr, self.weight_decay, self.encoder_lr = float(lr), float(weight_decay), encoder_lr
        self.loss_weights = dict(loss_weights or {})
        self._names: dict[str, list[str]] = {}
        for split, named in data.items():
            self._names[split] = list(named)
            for name, value in named.items():
                self.register_buffer(f"_{split}__{name}", value, persistent=False)

    def split_data(self, split: str) -> dict[str, torch.Tensor]:
        """The tensors of one split, on the module's device."""
        return {name: getattr(self, f"_{split}__{name}") for name in self._names.get(split, [])}

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:  # e.g. contrastive negatives from every device's batch
            gathered = self.all_gather(x, sync_grads=True)
            assert isinstance(gathered, torch.Tensor)
            return gathered.flatten(0, 1)
        return x

    def _step(self, split: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = self.net.losses(batch, self.split_data(split), self._gather)  # type: ignore[operator]
        total = sum(float(self.loss_weights.get(k, 1.0)) * v for k, v in losses.items())
        size = int(batch["index"].shape[0])
        sync = self.trainer.world_size > 1  # epoch means over every process's batches
        self.log(f"{split}_loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=sync)
        if len(losses) > 1:
            for k, v in losses.items():
                self.log(f"{split}_{k}", v, on_step=False, on_epoch=True, batch_size=size, sync_dist=sync)
        return total

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        return self._step("val", batch)

    def on_train_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("train_loss")
        if loss is not None:
            logger.debug(f"{type(self.net).__name__} epoch {self.current_epoch}: train_loss {float(loss):.4f}")

    def configure_optimizers(self):
        encoder = getattr(self.net, "image_encoder", None)
        if encoder is None:
            return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        enc_ids = {id(p) for p in encoder.parameters()}
        groups = [
            {"params": [p for p in self.net.parameters() if id(p) not in enc_ids], "lr": self.lr},
            {
                "params": list(encoder.parameters()),
                "lr": self.lr if self.encoder_lr is None else float(self.encoder_lr),
            },
        ]
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)


_HISTORY_PREFIX = "stexp_history/"


class _History(L.Callback):
    """Collects the epoch-level metrics Lightning logged.

    Under the fork/spawn DDP launchers the callback that collects lives in the worker processes; at the end
    of training it stores the history in ``trainer.callback_metrics``, which Lightning sends back from rank 0
    to the calling process (:meth:`recover`).
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if not key.endswith("_step") and not key.startswith(_HISTORY_PREFIX):
                self.history.setdefault(key.removesuffix("_epoch"), []).append(float(value))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            for key, values in self.history.items():
                trainer.callback_metrics[_HISTORY_PREFIX + key] = torch.tensor(values, dtype=torch.float64)

    def recover(self, trainer) -> dict[str, list[float]]:
        """The history, from this process or (spawned workers) from what rank 0 sent back."""
        if not self.history:
            for key, value in trainer.callback_metrics.items():
                if key.startswith(_HISTORY_PREFIX):
                    self.history[key.removeprefix(_HISTORY_PREFIX)] = [float(v) for v in value.reshape(-1)]
        return self.history


class _EpochProgressBar(L.pytorch.callbacks.ProgressBar):
    """One tqdm bar per fit that advances per epoch and shows the losses.

    Lightning's own bars redraw every step of every epoch: on cached features an epoch takes a
    fraction of a second, and a notebook fills with hundreds of lines.
    """

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
            self.bar = tqdm(total=trainer.max_epochs, desc=f"train {name}", unit="epoch", leave=False, mininterval=1.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            metrics = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k.endswith("_loss")}
            self.bar.set_postfix(metrics, refresh=False)
            self.bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train(
    module: L.LightningModule,
    train_loader,
    val_loader=None,
    *,
    max_epochs: int,
    device: str | None = "auto",
    seed: int = 0,
    precision: Any = None,
    early_stopping_patience: int | None = None,
    gradient_clip_val: float | None = None,
    devices: int | list[int] | None = None,
) -> dict[str, list[float]]:
    """Fit a LightningModule and return its per-epoch history (``{"train_loss": [...], ...}``).

    Parameters
    ----------
    module
        The LightningModule (usually a :class:`TrainingPlan`).
    train_loader, val_loader
        DataLoaders; with ``val_loader`` the module must log ``"val_loss"``.
    max_epochs
        Number of epochs (fewer with early stopping).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    seed
        Seeds python, numpy and torch for the run; CPU runs are deterministic for a seed. The caller's
        global RNG states are restored afterwards.
    precision
        Lightning precision; default ``"bf16-mixed"`` on GPUs that support it, else ``"32-true"``.
    early_stopping_patience
        Stop when ``val_loss`` has not improved for this many epochs (needs ``val_loader``).
    gradient_clip_val
        Clip gradients to this norm.
    devices
        Number of devices (or GPU indices) to train on with DDP, one process each (see :func:`parallel_plan`);
        ``None``: one. Each process draws ``batch_size`` spots per step from its share of the data. After
        training, this process holds the trained weights (rank 0's, identical on every rank) and the history.
    """
    plan = parallel_plan(device, devices)
    accelerator, devices, strategy = plan["accelerator"], plan["devices"], plan["strategy"]
    if precision is None:
        precision = "bf16-mixed" if accelerator == "gpu" and torch.cuda.is_bf16_supported() else "32-true"
    history = _History()
    callbacks: list[L.Callback] = [history]
    if val_loader is not None and early_stopping_patience:
        callbacks.append(L.pytorch.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience))
    if settings.show_progress:
        callbacks.append(_EpochProgressBar())
    # Lightning's banners ("GPU available...", tips) are printed while the Trainer is built: quiet them first.
    names = ["lightning", "lightning.pytorch", "lightning.fabric"]
    names += [f"{n}.utilities.rank_zero" for n in ("lightning.pytorch", "lightning.fabric")]
    lightning_loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in lightning_loggers]
    with preserve_process_state():
        for lg in lightning_loggers:
            lg.setLevel(logging.WARNING)
        try:
            if accelerator == "cpu":
                torch.set_num_threads(settings.n_jobs)
            L.seed_everything(int(seed), workers=True, verbose=False)
            trainer = L.Trainer(
                max_epochs=int(max_epochs),
                accelerator=accelerator,
                devices=devices,
                num_nodes=plan["num_nodes"],
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
                warnings.filterwarnings(
                    "ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*"
                )
                # Lightning's own use of a torch API that torch deprecated: nothing a user can act on
                warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
                # Lightning's all_gather(sync_grads=True) under DDP: same (forked workers inherit these filters)
                warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
                with _sharing_strategy("file_system" if strategy == "ddp_spawn" else None):
                    try:
                        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
                    except SystemExit as err:  # Lightning turns Ctrl+C into sys.exit(1): give the interrupt back
                        if trainer.interrupted:
                            raise KeyboardInterrupt("training interrupted; nothing was fitted") from err
                        raise
        finally:
            for lg, level in zip(lightning_loggers, levels, strict=True):
                lg.setLevel(level)
    logger.debug(
        f"trained {trainer.current_epoch} epochs on {accelerator} ({plan['world_size']} process(es), strategy "
        f"{strategy}), precision {precision}"
    )
    return history.recover(trainer)
