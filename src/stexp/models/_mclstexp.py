"""mclSTExp (Min et al. 2024): contrastive spot/image embeddings, prediction by retrieval from the training spots.

Imported by the model registry on first use of ``model="mclstexp"`` (this module imports torch).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stexp._settings import logger, settings
from stexp.models._base import check_hparams
from stexp.models._data import SpotData
from stexp.models._finetune import FinetunableExpressionModel
from stexp.models._layers import ProjectionHead, info_nce
from stexp.models._registry import register_model
from stexp.models._torch import as_tensor

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
    projection_dim, n_layers, n_heads, head_dim, mlp_dim, dropout, attn_dropout, temperature, normalize_embeddings
        See :class:`MclSTExp`.
    encoder
        The image encoder ``(B, 3, H, W) -> (B, n_features)`` when it is fine-tuned; ``None`` on frozen features.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

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
        temperature: float = 1.0,
        normalize_embeddings: bool = False,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.temperature, self.normalize_embeddings = float(temperature), bool(normalize_embeddings)
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

    def losses(self, batch, data, gather) -> dict[str, torch.Tensor]:
        """Symmetric CLIP loss between the batch's spot and image embeddings (negatives from every device)."""
        index = batch["index"]
        image = self.embed_images(batch["x"] if "x" in batch else data["features"][index])
        spot = self.embed_spots(data["target"][index], data["rc"][index])
        loss = info_nce(gather(spot), gather(image), temperature=self.temperature, normalize=self.normalize_embeddings)
        return {"nce": loss}


@register_model("mclstexp")
class MclSTExp(FinetunableExpressionModel):
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
        prediction, the average of their measured expression with weights ∝ 1/d², d the L1
        (Manhattan) distance between the un-normalised embeddings, as the official evaluation does
        (``evel_her2st.py``: ``np.linalg.norm(..., ord=1)``). The spread is
        the weighted standard deviation over those neighbours. The retrieval runs in torch in
        chunks of queries (bounded memory).

    Hyper-parameters (the keyword arguments of ``__init__``; ``default_hparams``)
        Paper defaults: ``projection_dim=256``, ``n_layers=2``, ``n_heads=8``, ``head_dim=64``,
        ``mlp_dim=None`` (the number of genes), ``attn_dropout=0``, ``dropout=0`` (projection
        heads: the official ``ProjectionHead`` defaults to 0 and ``mclSTExp_Attention`` never passes
        ``dropout`` on; 0.1 is BLEEP's), ``temperature=1``, ``normalize_embeddings=False`` (logits are raw dot products),
        ``lr=1e-4``, ``weight_decay=1e-3``, ``batch_size=128``, ``max_epochs=90``, ``top_k=200``.
        stexp's: ``position_margin=8``, ``bank_passes=1``, ``standardize_features=True``,
        ``early_stopping_patience=10`` (only with ``validation=``), ``seed=0``. Fine-tuning
        (:class:`~stexp.models._finetune.FinetunableExpressionModel`): ``finetune_encoder=False``,
        ``augment=True`` (flips, 90° rotations, colour jitter of the patch dataset when fine-tuning),
        ``hed_jitter=0`` (HED stain augmentation of that strength when fine-tuning, e.g. 0.05),
        ``encoder_lr=None`` (the encoder's learning rate; ``None``: ``lr``).

    Deviations from the official code (the full audit: ``docs/methods.md``)
        Frozen features (z-scored) replace the end-to-end DenseNet-121 by default (fine-tuning is an
        option; GPU advised). Position tables are sized to the data. Bank sentences are built like
        training sentences (see above). AdamW (decoupled weight decay) instead of Adam with an L2
        penalty. The target is log1p of counts per 10k over all genes (see :mod:`stexp.pp._target`);
        the official code uses log10(1 + counts per median library size over the panel genes). The
        loss is the official one: one-hot (``torch.eye``) targets, raw dot products, temperature 1.
    """

    bank_size_hparams: ClassVar[tuple[str, ...]] = ("top_k",)

    def __init__(
        self,
        genes: list[str],
        *,
        projection_dim: int = 256,
        n_layers: int = 2,
        n_heads: int = 8,
        head_dim: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        temperature: float = 1.0,
        normalize_embeddings: bool = False,
        top_k: int = 200,
        position_margin: int = 8,
        bank_passes: int = 1,
        standardize_features: bool = True,
        max_epochs: int = 90,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            projection_dim=projection_dim,
            n_layers=n_layers,
            n_heads=n_heads,
            head_dim=head_dim,
            mlp_dim=mlp_dim,
            dropout=dropout,
            attn_dropout=attn_dropout,
            temperature=temperature,
            normalize_embeddings=normalize_embeddings,
            top_k=top_k,
            position_margin=position_margin,
            bank_passes=bank_passes,
            standardize_features=standardize_features,
            max_epochs=max_epochs,
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )
        check_hparams(
            self,
            positive_int=("projection_dim", "n_heads", "head_dim", "mlp_dim", "top_k", "bank_passes"),
            non_negative_int=("n_layers", "position_margin"),
            positive=("temperature",),
            fraction=("dropout", "attn_dropout"),
        )
        self.bank_embeddings: np.ndarray | None = None
        self.bank_expression: np.ndarray | None = None

    # -- the network and its data -------------------------------------------------------------
    def build_network(self, *, n_features: int, encoder: nn.Module | None, **sizes: int) -> MclSTExpNetwork:
        hp = self.hparams
        n_genes = len(self.genes)
        return MclSTExpNetwork(
            n_features,
            n_genes,
            sizes["n_rows"],
            sizes["n_cols"],
            projection_dim=hp["projection_dim"],
            n_layers=hp["n_layers"],
            n_heads=hp["n_heads"],
            head_dim=hp["head_dim"],
            mlp_dim=hp["mlp_dim"] or n_genes,
            dropout=hp["dropout"],
            attn_dropout=hp["attn_dropout"],
            temperature=hp["temperature"],
            normalize_embeddings=hp["normalize_embeddings"],
            encoder=encoder,
        )

    def network_sizes(self, train: SpotData) -> dict[str, int]:
        if (train.array_rc < 0).any():
            raise ValueError(
                f"mclstexp: array coordinates must be non-negative integers (min {int(train.array_rc.min())})."
            )
        margin = self.hparams["position_margin"]
        n_rows, n_cols = (int(m) + 1 + margin for m in train.array_rc.max(axis=0))
        return {"n_rows": n_rows, "n_cols": n_cols}

    def legacy_sizes(self, state: dict[str, np.ndarray]) -> dict[str, int]:
        return {
            "n_features": int(state["net.image_projection.projection.weight"].shape[1]),
            "n_rows": int(state["net.y_embed.weight"].shape[0]),
            "n_cols": int(state["net.x_embed.weight"].shape[0]),
        }

    def training_tensors(self, data: SpotData) -> dict[str, torch.Tensor]:
        return {**super().training_tensors(data), "rc": as_tensor(data.array_rc, torch.int64)}

    def validation_order(self, n: int) -> torch.Tensor:
        """Validation sentences: one fixed random grouping of the spots, the same every epoch (losses compare)."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams["seed"]))

    def _check_top_k(self, n_bank: int) -> None:
        k = self.hparams["top_k"]
        if k > n_bank:
            raise ValueError(
                f"mclstexp: top_k={k} is larger than the reference bank ({n_bank} training spots); "
                f"pass top_k <= {n_bank}."
            )

    # -- ExpressionModel ----------------------------------------------------------------------
    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        self._check_top_k(train.n_spots)
        super()._fit(train, validation)

    def after_fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        batch_size = self.contrastive_batch_size(train.n_spots)  # negatives from every DDP process
        chance = math.log(batch_size)
        self.history = {
            "train_loss": self.history.get("train_loss", []),
            "val_loss": self.history.get("val_loss", []),
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
        target, rc = as_tensor(train.target), as_tensor(train.array_rc, torch.int64)
        batch_size = min(hp["batch_size"], train.n_spots)
        bank = torch.zeros(train.n_spots, hp["projection_dim"])
        generator = torch.Generator().manual_seed(hp["seed"])
        with self.on_device() as (net, device):
            for _ in range(hp["bank_passes"]):
                order = torch.randperm(train.n_spots, generator=generator)
                for start in range(0, train.n_spots, batch_size):
                    idx = order[start : start + batch_size]
                    bank[idx] += net.embed_spots(target[idx].to(device), rc[idx].to(device)).float().cpu()
        self.bank_embeddings = (bank / hp["bank_passes"]).numpy()
        self.bank_expression = target.numpy().copy()

    @torch.no_grad()
    def embed_images(self, data: SpotData) -> np.ndarray:
        """Image-branch embeddings ``(n_spots, projection_dim)`` of the spots of ``data`` (un-normalised)."""
        self.check_features(data)
        with self.on_device() as (net, device):
            feats = self.image_features(data, device)
            out = [
                net.project_features(feats[start : start + 4096].to(device)).float().cpu()
                for start in range(0, data.n_spots, 4096)
            ]
        return torch.cat(out).numpy()

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        assert self.bank_embeddings is not None and self.bank_expression is not None, "the model has no reference bank"
        self._check_top_k(self.bank_embeddings.shape[0])
        return retrieve(
            self.embed_images(data),
            self.bank_embeddings,
            self.bank_expression,
            k=self.hparams["top_k"],
            device=settings.resolve_device(self.device),
            distance="l1",
        )

    def extra_state(self) -> dict[str, np.ndarray]:
        return {
            "bank.embeddings": np.asarray(self.bank_embeddings, dtype=np.float32),
            "bank.expression": np.asarray(self.bank_expression, dtype=np.float32),
        }

    def check_bank_state(self, state: dict[str, np.ndarray], keys: tuple[str, ...]) -> None:
        """Raise a ValueError when the saved bank lacks ``keys`` or its expression has another gene panel."""
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"{self.name}: the saved weights lack {missing}; not an {self.name} state.")
        if state["bank.expression"].shape[1] != len(self.genes):
            raise ValueError(
                f"{self.name}: the saved reference bank has {state['bank.expression'].shape[1]} genes, "
                f"the model's panel (model.json) {len(self.genes)}."
            )

    def load_extra_state(self, state: dict[str, np.ndarray]) -> None:
        self.check_bank_state(state, ("bank.embeddings", "bank.expression"))
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
    distance: Literal["l1", "l2"] = "l1",
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
    distance
        ``d`` of the weights: ``"l1"`` (mclSTExp's evaluation code, ``evel_her2st.py``) or ``"l2"`` (Euclidean).

    Returns
    -------
    The weighted mean ``(n, G)`` and the weighted standard deviation ``(n, G)`` of the neighbours' expression.
    """
    m = bank_embeddings.shape[0]
    if distance not in ("l1", "l2"):
        raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}.")
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
            diff = bank[top] - q[:, None, :]  # (c, k, P)
            d2 = (diff.abs().sum(-1).pow(2) if distance == "l1" else diff.pow(2).sum(-1)).double()  # (c, k)
            w = 1.0 / d2.clamp(min=1e-12)
            w = (w / w.sum(1, keepdim=True)).float().unsqueeze(-1)  # (c, k, 1)
            neighbours = expr[top]  # (c, k, G)
            mean = (w * neighbours).sum(1)
            var = (w * (neighbours - mean[:, None, :]).pow(2)).sum(1)
            means.append(mean.cpu())
            stds.append(var.clamp(min=0).sqrt().cpu())
    return torch.cat(means).numpy(), torch.cat(stds).numpy()
