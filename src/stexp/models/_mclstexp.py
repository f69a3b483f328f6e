"""mclSTExp (Min et al. 2024): contrastive spot/image embeddings, prediction by retrieval from the training spots.

Imported by the model registry on first use of ``model="mclstexp"`` (this module imports torch).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stexp._settings import logger, settings
from stexp.models._base import ExpressionModel
from stexp.models._data import SpotData
from stexp.models._finetune import FINETUNE_HPARAMS
from stexp.models._layers import ProjectionHead, feature_scaling, info_nce
from stexp.models._registry import register_model

#: Floats of neighbour expression gathered per retrieval chunk (``chunk x k x genes``): 128 MB in float32.
RETRIEVAL_CHUNK_ELEMENTS = 2**25
#: The final training loss must fall below this fraction of the chance level ln(batch) or a warning is logged.
CHANCE_FRACTION = 0.98


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    The attention has ``n_heads`` heads of ``head_dim`` (inner width ``n_heads * head_dim``,
    projected back to ``dim``), so ``dim`` (the number of genes) need not be divisible by the heads.
    """

    def __init__(self, dim: int, *, n_heads: int, head_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, dim) -> (B, n, dim)``: each of the ``n`` tokens attends to all ``n``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, n, head_dim)
        x = x + self.out(attended.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))


class MclSTExpNetwork(nn.Module):
    """The two branches of mclSTExp (see :class:`MclSTExp`).

    Parameters
    ----------
    n_features
        Width of the image features (frozen features, or the fine-tuned encoder's output).
    n_genes
        Number of genes: the width of the spot tokens and of the position tables.
    n_rows, n_cols
        Rows of the y (array row) and x (array column) position tables.
    projection_dim, n_layers, n_heads, head_dim, mlp_dim, dropout, attn_dropout
        See :class:`MclSTExp`.
    encoder
        The image encoder ``(B, 3, H, W) -> (B, n_features)`` when it is fine-tuned; ``None`` on frozen features.
    """

    def __init__(
        self,
        n_features: int,
        n_genes: int,
        n_rows: int,
        n_cols: int,
        *,
        projection_dim: int,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        mlp_dim: int,
        dropout: float,
        attn_dropout: float,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = encoder
        self.x_embed = nn.Embedding(n_cols, n_genes)
        self.y_embed = nn.Embedding(n_rows, n_genes)
        self.spot_encoder = nn.Sequential(
            *[
                SelfAttentionBlock(n_genes, n_heads=n_heads, head_dim=head_dim, mlp_dim=mlp_dim, dropout=attn_dropout)
                for _ in range(n_layers)
            ]
        )
        self.spot_projection = ProjectionHead(n_genes, projection_dim, dropout=dropout)
        self.image_projection = ProjectionHead(n_features, projection_dim, dropout=dropout)
        # Image features are z-scored with the training spots' frozen-feature mean and std (saved with the weights).
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def embed_spots(self, expression: torch.Tensor, array_rc: torch.Tensor) -> torch.Tensor:
        """Spot embeddings of one "sentence" of spots: expression ``(n, G)``, array (row, col) ``(n, 2)`` -> ``(n, P)``.

        Array coordinates outside the tables (slides not seen in training) are clipped to the last row.
        """
        rows = array_rc[:, 0].clamp(0, self.y_embed.num_embeddings - 1)
        cols = array_rc[:, 1].clamp(0, self.x_embed.num_embeddings - 1)
        tokens = expression + self.x_embed(cols) + self.y_embed(rows)
        return self.spot_projection(self.spot_encoder(tokens.unsqueeze(0)).squeeze(0))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(n, P)`` from frozen features ``(n, D)`` or, when fine-tuning, patches ``(n, 3, H, W)``."""
        if self.image_encoder is not None:
            x = self.image_encoder(x)
        return self.project_features(x)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(n, P)`` from image features ``(n, D)`` (z-scored, then the projection head)."""
        return self.image_projection((features.float() - self.feature_mean) / self.feature_std)


@register_model("mclstexp")
class MclSTExp(ExpressionModel):
    """mclSTExp (Min et al., 2024): multimodal contrastive learning of spots and images, prediction by retrieval.

    Train it with ``stexp.tl.fit(adata, model="mclstexp", ...)``; every hyper-parameter below is a
    keyword of ``fit``.

    Design
        *Image branch*: the spot's image features (frozen features from ``obsm``, z-scored with the
        training spots' statistics; or, with ``finetune_encoder=True``, the image encoder itself run
        on augmented patches) go through a projection head (Linear-GELU-Linear, dropout, residual
        add of the first Linear's output, LayerNorm) to ``projection_dim``. *Spot branch*: the
        spot's expression target plus learnt x and y position embeddings (one table per axis,
        indexed by the integer array column and row, as wide as the gene panel), then
        ``n_layers`` pre-LayerNorm Transformer blocks (``n_heads`` heads of ``head_dim``) in which
        the spots of a mini-batch form the "sentence", then a projection head. Loss: symmetric
        CLIP cross-entropy between the spot and image embeddings of a batch (the diagonal pairs
        positive, both directions weighted 0.5, ``temperature``), AdamW. Under DDP the embeddings of
        every device are gathered, so negatives span the global batch.

    Position tables
        Sized to the largest array row/column of the training spots plus ``position_margin`` rows,
        not 65,536 (the paper's code: ~100M mostly unused parameters). Coordinates beyond the
        table (only possible for slides not seen in training, e.g. the validation slide) are
        clipped to its last row. Prediction never uses positions (image branch only).

    Sentences
        Training batches are ``batch_size`` spots drawn at random across all training slides
        (slides mixed within a sentence), reshuffled every epoch. The reference bank is built the
        same way: the training spots in random sentences of ``batch_size`` (a fixed seed), averaged
        over ``bank_passes`` different random groupings. The paper's code built the bank from
        sentences in file order, unlike its training sentences.

    Fine-tuning (``finetune_encoder=True``)
        The encoder that made the features (rebuilt from their spec in ``adata.uns["stexp"]``: e.g.
        ``densenet121`` as in the paper, or ``efficientnet_lite0`` offline) is trained end to end
        with the heads, on patches cut once per slide and augmented per item (``augment``: flips,
        90° rotations, colour jitter), at ``encoder_lr``. Its output is z-scored with the frozen
        features' statistics, so the heads start on the same scale. The fine-tuned weights are
        saved with the model; prediction embeds the query patches with them (``obsm`` features are
        not read). GPU advised (bf16 mixed precision there); it also runs on a CPU for small data.

    Prediction
        Images only: each query spot's image embedding is compared (cosine) with the spot
        embeddings of the reference bank (the training spots); the ``top_k`` most similar give the
        prediction, the average of their measured expression with weights ∝ 1/d², d the
        Euclidean distance between the un-normalised embeddings (as in the paper). The spread is
        the weighted standard deviation over those neighbours. The retrieval runs in torch in
        chunks of queries (bounded memory).

    Hyper-parameters (``default_hparams``)
        Paper defaults: ``projection_dim=256``, ``n_layers=2``, ``n_heads=8``, ``head_dim=64``,
        ``mlp_dim=None`` (the number of genes), ``attn_dropout=0``, ``dropout=0.1`` (projection
        heads), ``temperature=1``, ``normalize_embeddings=False`` (logits are raw dot products),
        ``lr=1e-4``, ``weight_decay=1e-3``, ``batch_size=128``, ``max_epochs=90``, ``top_k=200``.
        stexp's: ``position_margin=8``, ``bank_passes=1``, ``standardize_features=True``,
        ``early_stopping_patience=10`` (only with ``validation=``), ``finetune_encoder=False``,
        ``augment=True`` (flips, 90° rotations, colour jitter of the patch dataset when fine-tuning),
        ``encoder_lr=None`` (the encoder's learning rate; ``None``: ``lr``), ``num_workers=0``
        (patch-loading workers when fine-tuning), ``device="auto"``, ``seed=0``.

    Deviations from the paper
        The loss uses diagonal (one-hot) positives as CLIP does; the paper's code used BLEEP's soft
        targets (softmax of the mean within-modality similarities). Frozen features replace the
        end-to-end DenseNet-121 by default (fine-tuning is an option; GPU advised). Position tables
        are sized to the data. Bank sentences are built like training sentences (see above). The
        target is log1p of counts per 10k (see :mod:`stexp.pp._target`).
    """

    default_hparams: ClassVar[dict[str, Any]] = {
        "projection_dim": 256,
        "n_layers": 2,
        "n_heads": 8,
        "head_dim": 64,
        "mlp_dim": None,
        "dropout": 0.1,
        "attn_dropout": 0.0,
        "temperature": 1.0,
        "normalize_embeddings": False,
        "top_k": 200,
        "position_margin": 8,
        "bank_passes": 1,
        "standardize_features": True,
        "max_epochs": 90,
        "batch_size": 128,
        "lr": 1e-4,
        "weight_decay": 1e-3,
        "early_stopping_patience": 10,
        **FINETUNE_HPARAMS,
        "device": "auto",
        "seed": 0,
    }

    def __init__(self, genes: list[str], **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        self._check_hparams()
        self.network: MclSTExpNetwork | None = None
        self.n_features: int | None = None
        self.bank_embeddings: np.ndarray | None = None
        self.bank_expression: np.ndarray | None = None
        self.encoder = None  # the fine-tuned stexp.images.Encoder (finetune_encoder=True)

    def _check_hparams(self) -> None:
        hp = self.hparams
        for key in ("projection_dim", "n_heads", "head_dim", "max_epochs", "batch_size", "top_k", "bank_passes"):
            if int(hp[key]) != hp[key] or hp[key] < 1:
                raise ValueError(f"mclstexp: {key} must be a positive integer, got {hp[key]!r}.")
        for key in ("n_layers", "position_margin", "early_stopping_patience", "num_workers"):
            if int(hp[key]) != hp[key] or hp[key] < 0:
                raise ValueError(f"mclstexp: {key} must be a non-negative integer, got {hp[key]!r}.")
        if hp["mlp_dim"] is not None and (int(hp["mlp_dim"]) != hp["mlp_dim"] or hp["mlp_dim"] < 1):
            raise ValueError(f"mclstexp: mlp_dim must be a positive integer or None, got {hp['mlp_dim']!r}.")
        for key in ("temperature", "lr"):
            if not hp[key] > 0:
                raise ValueError(f"mclstexp: {key} must be positive, got {hp[key]!r}.")
        if not hp["weight_decay"] >= 0:
            raise ValueError(f"mclstexp: weight_decay must be >= 0, got {hp['weight_decay']!r}.")
        for key in ("dropout", "attn_dropout"):
            if not 0 <= hp[key] < 1:
                raise ValueError(f"mclstexp: {key} must be in [0, 1), got {hp[key]!r}.")

    # -- helpers ------------------------------------------------------------------------------
    def _build(self, n_features: int, n_rows: int, n_cols: int, encoder: nn.Module | None = None) -> MclSTExpNetwork:
        hp = self.hparams
        self.n_features = int(n_features)
        n_genes = len(self.genes)
        return MclSTExpNetwork(
            self.n_features,
            n_genes,
            int(n_rows),
            int(n_cols),
            projection_dim=int(hp["projection_dim"]),
            n_layers=int(hp["n_layers"]),
            n_heads=int(hp["n_heads"]),
            head_dim=int(hp["head_dim"]),
            mlp_dim=int(hp["mlp_dim"] or n_genes),
            dropout=float(hp["dropout"]),
            attn_dropout=float(hp["attn_dropout"]),
            encoder=encoder,
        )

    def _check_top_k(self, n_bank: int) -> None:
        k = int(self.hparams["top_k"])
        if k > n_bank:
            raise ValueError(
                f"mclstexp: top_k={k} is larger than the reference bank ({n_bank} training spots); "
                f"pass top_k <= {n_bank}."
            )

    def _check_features(self, data: SpotData, what: str) -> None:
        if self.hparams["finetune_encoder"]:
            return
        if data.features.shape[1] != self.n_features:
            raise ValueError(
                f"mclstexp: the model was trained on {self.n_features}-dimensional image features, "
                f"the {what} have {data.features.shape[1]}; use the features the model was trained on."
            )

    @staticmethod
    def _tensors(data: SpotData) -> dict[str, torch.Tensor]:
        return {
            "features": torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(data.target, dtype=np.float32)),
            "rc": torch.from_numpy(np.ascontiguousarray(data.array_rc, dtype=np.int64)),
        }

    # -- ExpressionModel ----------------------------------------------------------------------
    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        from stexp.models import _finetune
        from stexp.models._engine import make_loader, train_with_hparams

        hp = self.hparams
        finetune = bool(hp["finetune_encoder"])
        self._check_top_k(train.n_spots)
        if (train.array_rc < 0).any():
            raise ValueError(
                f"mclstexp: array coordinates must be non-negative integers (min {int(train.array_rc.min())})."
            )
        if validation is not None and validation.target is None:
            raise ValueError("validation data have no measured expression (target is None).")
        seed = int(hp["seed"])
        torch.manual_seed(seed)
        margin = int(hp["position_margin"])
        n_rows, n_cols = (int(m) + 1 + margin for m in train.array_rc.max(axis=0))
        self.encoder = _finetune.training_encoder(self, train.features.shape[1])
        net = self._build(train.features.shape[1], n_rows, n_cols, encoder=self.encoder.module if finetune else None)
        if validation is not None:
            self._check_features(validation, "validation features")
        tensors = {"train": self._tensors(train)}
        if bool(hp["standardize_features"]):  # frozen features; when fine-tuning, the encoder's starting point
            with torch.no_grad():
                feats = tensors["train"]["features"]
                mean, std = feature_scaling(feats)
                net.feature_mean.copy_(mean)
                net.feature_std.copy_(std)
        if validation is not None:
            tensors["val"] = self._tensors(validation)
        if finetune:  # patches replace the frozen features
            for named in tensors.values():
                del named["features"]

        batch_size = min(int(hp["batch_size"]), train.n_spots)
        index = lambda n: torch.utils.data.TensorDataset(torch.arange(n))
        collate = {"train": None, "val": None}
        if finetune:
            collate["train"] = _finetune.PatchBatch(
                _finetune.spot_patches(train, self.encoder, self.encoder_spec, augment=bool(hp["augment"]))
            )
            if validation is not None:
                collate["val"] = _finetune.PatchBatch(
                    _finetune.spot_patches(validation, self.encoder, self.encoder_spec, augment=False)
                )
        workers = int(hp["num_workers"]) if finetune else 0
        train_loader = make_loader(
            index(train.n_spots),
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
            drop_last=train.n_spots > batch_size,
            num_workers=workers,
            collate_fn=collate["train"],
        )
        val_loader = None
        if validation is not None:
            # Validation sentences: one fixed random grouping of the validation spots (mixed like the training
            # ones, the same every epoch so that validation losses compare).
            order = torch.randperm(validation.n_spots, generator=torch.Generator().manual_seed(seed))
            val_loader = make_loader(
                torch.utils.data.TensorDataset(order),
                batch_size=batch_size,
                shuffle=False,
                seed=seed,
                num_workers=workers,
                collate_fn=collate["val"],
            )
        chance = math.log(batch_size)
        module = _lightning_module(net, tensors, hp, chance=chance, validate=val_loader is not None)
        module.net.train()  # build_encoder returns the encoder in eval mode; fine-tuning trains it (BatchNorm too)
        history = train_with_hparams(module, train_loader, val_loader, hp)
        self.network = module.net.to("cpu").eval()
        self.history = {
            "train_loss": history.get("train_loss", []),
            "val_loss": history.get("val_loss", []),
            "chance_loss": chance,
        }
        losses = self.history["train_loss"]
        if losses and not losses[-1] < CHANCE_FRACTION * chance:
            logger.warning(
                f"mclstexp: the training loss ended at {losses[-1]:.3f}, not below the chance level "
                f"ln(batch={batch_size}) = {chance:.3f}: the image and spot embeddings did not align. Train "
                "longer, raise lr, or check that the image features carry information."
            )
        elif losses:
            logger.info(
                f"mclstexp: train_loss {losses[0]:.3f} -> {losses[-1]:.3f} (chance ln({batch_size}) = {chance:.3f})"
            )
        self._build_bank(train)

    @torch.no_grad()
    def _build_bank(self, train: SpotData) -> None:
        """Spot-branch embeddings of the training spots in random sentences of ``batch_size``, with their expression."""
        hp = self.hparams
        device = settings.resolve_device(hp["device"])
        net = self.network.to(device).eval()
        t = self._tensors(train)
        batch_size = min(int(hp["batch_size"]), train.n_spots)
        bank = torch.zeros(train.n_spots, int(hp["projection_dim"]))
        generator = torch.Generator().manual_seed(int(hp["seed"]))
        try:
            for _ in range(int(hp["bank_passes"])):
                order = torch.randperm(train.n_spots, generator=generator)
                for start in range(0, train.n_spots, batch_size):
                    idx = order[start : start + batch_size]
                    emb = net.embed_spots(t["target"][idx].to(device), t["rc"][idx].to(device))
                    bank[idx] += emb.float().cpu()
        finally:
            self.network = net.to("cpu")
        self.bank_embeddings = (bank / int(hp["bank_passes"])).numpy()
        self.bank_expression = t["target"].numpy().copy()

    @torch.no_grad()
    def embed_images(self, data: SpotData) -> np.ndarray:
        """Image-branch embeddings ``(n_spots, projection_dim)`` of the spots of ``data`` (un-normalised)."""
        from stexp.models import _finetune

        self._check_features(data, "data")
        device = settings.resolve_device(self.hparams["device"])
        if self.encoder is not None:  # the fine-tuned encoder embeds the spots' patches
            feats = _finetune.encode_spots(self.encoder, data, self.encoder_spec, device=device)
        else:
            feats = torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32))
        net = self.network.to(device).eval()
        out = []
        try:
            for start in range(0, data.n_spots, 4096):
                out.append(net.project_features(feats[start : start + 4096].to(device)).float().cpu())
        finally:
            self.network = net.to("cpu")
        return torch.cat(out).numpy()

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_top_k(self.bank_embeddings.shape[0])
        query = self.embed_images(data)
        return retrieve(
            query,
            self.bank_embeddings,
            self.bank_expression,
            k=int(self.hparams["top_k"]),
            device=settings.resolve_device(self.hparams["device"]),
        )

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.network.state_dict().items()}
        state["bank.embeddings"] = np.asarray(self.bank_embeddings, dtype=np.float32)
        state["bank.expression"] = np.asarray(self.bank_expression, dtype=np.float32)
        return state

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        keys = ("net.image_projection.projection.weight", "net.x_embed.weight", "net.y_embed.weight", "bank.embeddings")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"mclstexp: the saved weights lack {missing}; not an mclSTExp state.")
        if state["net.x_embed.weight"].shape[1] != len(self.genes):
            raise ValueError(
                f"mclstexp: the saved position tables are {state['net.x_embed.weight'].shape[1]} genes wide, "
                f"the model's panel has {len(self.genes)} genes."
            )
        from stexp.models._finetune import loading_encoder

        self.encoder = loading_encoder(self)
        net = self._build(
            state["net.image_projection.projection.weight"].shape[1],
            state["net.y_embed.weight"].shape[0],
            state["net.x_embed.weight"].shape[0],
            encoder=None if self.encoder is None else self.encoder.module,
        )
        net.load_state_dict(
            {k.removeprefix("net."): torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("net.")}
        )
        self.network = net.eval()
        self.bank_embeddings = np.array(state["bank.embeddings"], dtype=np.float32)
        self.bank_expression = np.array(state["bank.expression"], dtype=np.float32)


def retrieve(
    query: np.ndarray,
    bank_embeddings: np.ndarray,
    bank_expression: np.ndarray,
    *,
    k: int,
    chunk_size: int | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Predict by top-k retrieval: cosine top-``k`` of the bank, weights ∝ 1/d² on the un-normalised embeddings.

    Parameters
    ----------
    query
        Query embeddings ``(n, P)``.
    bank_embeddings, bank_expression
        Reference embeddings ``(m, P)`` and their measured expression ``(m, G)``.
    k
        Neighbours per query (``<= m``).
    chunk_size
        Queries handled at once. ``None``: as many as keep the gathered neighbour expression
        (``chunk x k x G`` floats) near ``RETRIEVAL_CHUNK_ELEMENTS`` (128 MB), at most 1024; a fixed
        1024 queries took 3 GB with k=200 and 785 genes.
    device
        Torch device of the computation.

    Returns
    -------
    The weighted mean ``(n, G)`` and the weighted standard deviation ``(n, G)`` of the neighbours' expression.
    """
    m = bank_embeddings.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the size of the reference bank ({m}).")
    bank = torch.from_numpy(np.ascontiguousarray(bank_embeddings, dtype=np.float32)).to(device)
    expr = torch.from_numpy(np.ascontiguousarray(bank_expression, dtype=np.float32)).to(device)
    bank_unit = F.normalize(bank, dim=-1)
    q_all = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    means, stds = [], []
    with torch.no_grad():
        if chunk_size is None:
            chunk_size = int(min(1024, max(1, RETRIEVAL_CHUNK_ELEMENTS // (k * max(1, expr.shape[1])))))
        for start in range(0, q_all.shape[0], chunk_size):
            q = q_all[start : start + chunk_size].to(device)
            top = (F.normalize(q, dim=-1) @ bank_unit.T).topk(k, dim=1).indices  # (c, k)
            d2 = (bank[top] - q[:, None, :]).pow(2).sum(-1).double()  # (c, k)
            w = 1.0 / d2.clamp(min=1e-12)
            w = (w / w.sum(1, keepdim=True)).float().unsqueeze(-1)  # (c, k, 1)
            neighbours = expr[top]  # (c, k, G)
            mean = (w * neighbours).sum(1)
            var = (w * (neighbours - mean[:, None, :]).pow(2)).sum(1)
            means.append(mean.cpu())
            stds.append(var.clamp(min=0).sqrt().cpu())
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


def _lightning_module(
    net: MclSTExpNetwork,
    tensors: dict[str, dict[str, torch.Tensor]],
    hp: dict[str, Any],
    *,
    chance: float,
    validate: bool,
):
    """The LightningModule that trains ``net`` on frozen features kept in non-persistent buffers."""
    import lightning as L

    class MclSTExpModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            for split, named in tensors.items():
                for name, value in named.items():
                    self.register_buffer(f"{split}_{name}", value, persistent=False)

        def _step(self, split: str, batch) -> torch.Tensor:
            if isinstance(batch, dict):  # fine-tuning: the batch's patches go through the encoder
                index, image = batch["index"], self.net.embed_images(batch["x"])
            else:
                index = batch[0]
                image = self.net.embed_images(getattr(self, f"{split}_features")[index])
            spot = self.net.embed_spots(getattr(self, f"{split}_target")[index], getattr(self, f"{split}_rc")[index])
            if self.trainer.world_size > 1:  # negatives from every device's batch
                spot = self.all_gather(spot, sync_grads=True).flatten(0, 1)
                image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            loss = info_nce(
                spot, image, temperature=float(hp["temperature"]), normalize=bool(hp["normalize_embeddings"])
            )
            self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=int(index.shape[0]))
            return loss

        def training_step(self, batch, batch_idx):
            return self._step("train", batch)

        def on_train_epoch_end(self) -> None:
            loss = self.trainer.callback_metrics.get("train_loss")
            if loss is not None:
                logger.debug(f"mclstexp epoch {self.current_epoch}: train_loss {float(loss):.4f} (chance {chance:.4f})")

        def configure_optimizers(self):
            from stexp.models._finetune import optimizer

            return optimizer(
                self.net, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]), encoder_lr=hp["encoder_lr"]
            )

    if validate:  # only then: Lightning warns about a validation_step without validation data
        MclSTExpModule.validation_step = lambda self, batch, batch_idx: self._step("val", batch)
    return MclSTExpModule()
