"""``embed_images(..., devices=N)``: the patches of the libraries to embed, sharded over processes by Lightning.

Each library's spots are cut into ``world_size`` contiguous chunks; Lightning's predict loop (the same
launchers as training: ``ddp_spawn`` from a script, ``ddp_notebook`` in Jupyter, ``ddp`` under torchrun or
SLURM, see :func:`stexp.models._engine.parallel_plan`) hands every process one chunk of every library,
which it embeds with the one-process code (:func:`stexp.pp._embed._embed_plan`: same decoding, resampling,
stain normalisation, BatchNorm re-estimation and batching; with ``adapt_bn`` every process re-estimates the
statistics on the same sample of the whole library, so that every chunk is embedded with the same ones).
The features of every process are then gathered (``all_gather``, no
shared file system needed); under the fork/spawn launchers rank 0 hands them to the calling process
through a temporary file on this machine, under a launcher every rank holds them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from stexp.models._engine import _sharing_strategy, parallel_plan


@dataclass
class EmbedJob:
    """One library to embed: its patch plan and the image's own µm/px (for ``mpp=``)."""

    plan: Any
    image_um_per_px: float


_LIGHTNING_LOGGERS = ["lightning", "lightning.pytorch", "lightning.fabric"] + [
    f"{n}.utilities.rank_zero" for n in ("lightning.pytorch", "lightning.fabric")
]


def _quiet_lightning() -> list[int]:
    """Lightning's banners to warnings only, and its warnings that no user can act on ignored; the old levels."""
    levels = []
    for name in _LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        levels.append(lg.level)
        lg.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
    return levels


def _one(items: list) -> Any:
    """``collate_fn``: the work unit itself (batches of one unit)."""
    return items[0]


class _Units(torch.utils.data.Dataset):
    """Work units ``(job, rows)``: chunk ``r`` of every job, job-major, so that rank ``r`` gets chunk ``r`` of each."""

    def __init__(self, sizes: list[int], world: int) -> None:
        self.units = [(j, c) for j, n in enumerate(sizes) for c in np.array_split(np.arange(n), world) if len(c)]

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int):
        return self.units[i]


class EmbedShards(L.LightningModule):
    """Embeds the work units this process is given and gathers every process's features at the end."""

    def __init__(
        self, enc, jobs: list[EmbedJob], *, batch_size: int, views: dict[str, Any], n_threads: int, progress: bool
    ) -> None:
        super().__init__()
        self.enc = enc
        self.jobs = jobs
        self.batch_size = int(batch_size)
        self.views = dict(views)
        self.n_threads = int(n_threads)
        self.progress = bool(progress)
        #: where rank 0 saves the gathered features for the calling process (fork/spawn launchers)
        self.handoff: str | None = None
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.result: list[np.ndarray] | None = None
        self._bar = None

    def __setstate__(self, state) -> None:
        # unpickled in a spawned worker before it joins the process group: quiet Lightning there too
        _quiet_lightning()
        super().__setstate__(state)

    def on_predict_start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.n_threads)
        if self.progress and self.global_rank == 0:
            from tqdm.auto import tqdm

            world = self.trainer.world_size
            total = sum(len(j.plan) for j in self.jobs)
            desc = f"embed {self.enc.name} (rank 0 of {world})"
            self._bar = tqdm(total=-(-total // world), desc=desc, unit="spot", leave=False)

    def predict_step(self, batch, batch_idx):
        from stexp.pp._embed import _embed_plan

        j, rows = batch
        job = self.jobs[int(j)]
        rows = np.asarray(rows, dtype=np.int64)
        feats = _embed_plan(
            self.enc, job.plan.subset(rows), batch_size=self.batch_size, device=str(self.device), pbar=self._bar,
            image_um_per_px=job.image_um_per_px, adapt_plan=job.plan, **self.views,
        )  # fmt: skip
        self.parts.append((int(j), rows, feats))

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process, stacked (one process: ``x`` itself)."""
        gathered = self.all_gather(x)
        assert isinstance(gathered, torch.Tensor)
        return gathered

    def on_predict_epoch_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        dim = int(self.enc.out_dim)
        ids = [np.stack([np.full(len(r), j), r], axis=1) for j, r, _ in self.parts]
        local_ids = np.concatenate(ids) if ids else np.zeros((0, 2), dtype=np.int64)
        local = np.concatenate([f for *_, f in self.parts]) if self.parts else np.zeros((0, dim), np.float32)
        # processes hold different numbers of spots: gather the counts, pad to the largest, gather, trim
        counts = self._gather(torch.tensor(len(local_ids), device=self.device)).reshape(-1).cpu().tolist()
        width = max(counts)
        pad_ids = torch.full((width, 2), -1, dtype=torch.int64)
        pad_ids[: len(local_ids)] = torch.from_numpy(local_ids.astype(np.int64))
        pad = torch.full((width, dim), float("nan"), dtype=torch.float32)
        pad[: len(local)] = torch.from_numpy(local)
        all_ids = self._gather(pad_ids.to(self.device)).reshape(-1, width, 2).cpu()
        all_feats = self._gather(pad.to(self.device)).reshape(-1, width, dim).cpu()
        all_ids = torch.cat([all_ids[r, :n] for r, n in enumerate(counts)])
        all_feats = torch.cat([all_feats[r, :n] for r, n in enumerate(counts)])
        self.result = _assemble(self.jobs, all_ids.numpy(), all_feats.numpy(), dim)
        if self.handoff is not None and self.global_rank == 0:
            # not through Lightning's return queue: its pipe is read only after the workers exit, so a
            # payload larger than the pipe's buffer never leaves the worker (a deadlock)
            np.savez(self.handoff, ids=all_ids.numpy(), features=all_feats.numpy())


def _assemble(jobs: list[EmbedJob], ids: np.ndarray, feats: np.ndarray, dim: int) -> list[np.ndarray]:
    """Per job, ``(n_spots, dim)`` features from gathered ``(job, row)`` ids; every spot must have come back once."""
    out = [np.full((len(job.plan), dim), np.nan, dtype=np.float32) for job in jobs]
    seen = [np.zeros(len(job.plan), dtype=np.int64) for job in jobs]
    for j in range(len(jobs)):
        mine = ids[:, 0] == j
        rows = ids[mine, 1]
        out[j][rows] = feats[mine]
        np.add.at(seen[j], rows, 1)
    missing = sum(int((s != 1).sum()) for s in seen)
    if missing:  # a sharding bug, never the user's input: refuse rather than return NaN features
        raise RuntimeError(f"parallel embedding returned {missing} spots not exactly once; please report this.")
    return out


def embed_jobs(
    enc, jobs: list[EmbedJob], *, devices: int, device: str, batch_size: int, views: dict[str, Any], n_threads: int,
    progress: bool,
) -> list[np.ndarray]:  # fmt: skip
    """Features of every job, computed by ``devices`` processes (per node) through Lightning's predict loop.

    Raises
    ------
    RuntimeError
        If a worker process failed (its error message is included).
    """
    plan = parallel_plan(device, devices)
    world = int(plan["world_size"])
    module = EmbedShards(
        enc, jobs, batch_size=batch_size, views=views, n_threads=max(1, n_threads // max(world, 1)), progress=progress
    )
    loader = torch.utils.data.DataLoader(
        _Units([len(j.plan) for j in jobs], world), batch_size=1, shuffle=False, collate_fn=_one
    )
    from stexp._settings import logger

    n_spots = sum(len(j.plan) for j in jobs)
    logger.info(
        f"embedding {n_spots} spots of {len(jobs)} librar{'y' if len(jobs) == 1 else 'ies'} on {world} "
        f"{plan['accelerator']} process(es) (Lightning strategy {plan['strategy']!r})"
    )
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="stexp-embed-") as tmp:
        if plan["strategy"] in ("ddp_spawn", "ddp_notebook"):  # workers on this machine, then gone
            module.handoff = os.path.join(tmp, "features.npz")
        levels = _quiet_lightning()
        try:
            return _run(plan, module, loader, jobs, int(enc.out_dim))
        finally:
            for name, level in zip(_LIGHTNING_LOGGERS, levels, strict=True):
                logging.getLogger(name).setLevel(level)


def _run(plan: dict[str, Any], module: EmbedShards, loader, jobs: list[EmbedJob], dim: int) -> list[np.ndarray]:
    """Lightning's predict loop over the work units; the assembled features of every job."""
    trainer = L.Trainer(
        accelerator=plan["accelerator"],
        devices=plan["devices"],
        num_nodes=plan["num_nodes"],
        strategy=plan["strategy"],
        precision="32-true",  # _embed_plan autocasts on CUDA itself, as on one device
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with _sharing_strategy("file_system" if plan["strategy"] == "ddp_spawn" else None):
        try:
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        except Exception as err:
            if type(err).__name__ != "ProcessRaisedException":  # torch.multiprocessing's wrapper of a worker's error
                raise
            last = [line for line in str(err).strip().splitlines() if line.strip()][-1]
            if last.startswith("ValueError: "):  # e.g. NaN features: raised as on one device
                raise ValueError(last.removeprefix("ValueError: ")) from err
            raise RuntimeError(f"embedding on {plan['world_size']} processes failed in a worker: {last}") from err
    if module.result is not None:  # this process was a rank (a launcher started it)
        return module.result
    if module.handoff is None or not os.path.isfile(module.handoff):
        raise RuntimeError("the embedding processes ended without handing their features back; please report this.")
    with np.load(module.handoff, allow_pickle=False) as saved:
        return _assemble(jobs, saved["ids"], saved["features"], dim)
