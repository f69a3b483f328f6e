"""NH2ST (Qu et al. 2025): dual-scale contrastive learning between image and expression, with neighbourhoods.

Imported by the model registry on first use of ``model="nh2st"`` (this module imports torch).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stexp.models._base import check_hparams
from stexp.models._data import SpotData
from stexp.models._finetune import FinetunableExpressionModel
from stexp.models._layers import ProjectionHead, info_nce
from stexp.models._neighbors import hypergraph_from_distances, knn_hypergraph, neighborhoods
from stexp.models._registry import register_model
from stexp.models._torch import as_tensor


def feature_distances(features: np.ndarray, nodes: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``1 - cosine`` similarity of the image features between the nodes of each neighbourhood, ``(n, m, m)``.

    NH2ST's ``build_hypergraph`` ranks the nodes of a neighbourhood by the cosine similarity of their
    image features; here the frozen features (rows of ``features``) of ``nodes`` ``(n, m)``.
    """
    feats = np.asarray(features, dtype=np.float32)
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    out = np.empty((*nodes.shape, nodes.shape[1]), dtype=np.float32)
    for start in range(0, nodes.shape[0], chunk):
        x = unit[nodes[start : start + chunk]]  # (c, m, D)
        out[start : start + chunk] = 1.0 - np.einsum("cid,cjd->cij", x, x)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the node axis of ``x`` ``(B, m, d)``, counting only nodes where ``mask`` ``(B, m)`` is True."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class HypergraphConv(nn.Module):
    """One hypergraph convolution (HGNN, Feng et al. 2019) on a batch of small hypergraphs.

    ``X' = Dv^-1/2 H De^-1 H^T Dv^-1/2 X Θ`` with unit hyperedge weights, where ``H`` ``(B, m, E)``
    is the node-by-hyperedge incidence and ``Dv``, ``De`` the node and hyperedge degrees.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, m, d)``, ``incidence`` ``(B, m, E)`` -> ``(B, m, d)``."""
        incidence = incidence.to(x.dtype)
        dv = incidence.sum(-1).clamp(min=1.0).rsqrt().unsqueeze(-1)  # (B, m, 1)
        de = incidence.sum(-2).clamp(min=1.0).reciprocal().unsqueeze(-1)  # (B, E, 1)
        x = self.linear(x) * dv
        edges = incidence.transpose(1, 2) @ x * de  # node -> hyperedge
        return incidence @ edges * dv  # hyperedge -> node


class _HypergraphBlock(nn.Module):
    """Hypergraph convolution, GELU, dropout, residual and LayerNorm; padding nodes stay zero."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.conv = HypergraphConv(dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, incidence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.dropout(F.gelu(self.conv(x, incidence))))
        return x * mask.to(x.dtype).unsqueeze(-1)


class _CrossAttention(nn.Module):
    """Tokens of one modality attend to the tokens of the other (``nn.MultiheadAttention``), then LayerNorm.

    There is no residual connection: the output is a mixture of the *other* modality's values,
    weighted by the query modality (the paper's ``softmax(Q_p K_g^T / sqrt(d)) V_g``).
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, other: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.attention(query, other, other, key_padding_mask=padding, need_weights=False)
        return self.norm(out)


class NH2STNetwork(nn.Module):
    """The NH2ST network on frozen image features (see :class:`NH2ST` for the design).

    Parameters
    ----------
    n_features
        Width of the frozen image features.
    n_genes
        Number of genes (the gene encoder's input and the regression head's output).
    dim
        Width of the shared embedding space.
    n_heads
        Attention heads of the cross-attention.
    hypergraph_layers
        Hypergraph convolution blocks in the neighbour branch.
    dropout
        Dropout of the projection head, gene encoder, hypergraph blocks and regression head.
    attn_dropout
        Dropout of the attention weights.
    use_neighbor_context
        Feed the regression head the neighbourhood's image context besides the target's image embedding.
    temperature_query, temperature_neighbor
        InfoNCE temperatures at the two scales.
    negative_weight, symmetric_loss
        Factor on the negative logits and whether both directions are averaged (:func:`info_nce`).
    linear_heads
        Gene encoder ``Linear-Linear`` and regression head ``Linear(dim//2)-Linear`` without activation
        (NH2ST's ``exp_encoder`` and ``Decoder``); ``False``: ``Linear-GELU-Dropout-Linear`` (stexp before issue 27).
    encoder
        The image encoder ``(B, 3, H, W) -> (B, n_features)`` when it is fine-tuned; ``None`` on frozen features.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    image_encoder: nn.Module | None

    def __init__(
        self,
        n_features: int,
        n_genes: int,
        *,
        dim: int,
        n_heads: int,
        hypergraph_layers: int,
        dropout: float,
        attn_dropout: float,
        use_neighbor_context: bool,
        temperature_query: float = 0.05,
        temperature_neighbor: float = 0.05,
        negative_weight: float = 1.0,
        symmetric_loss: bool = True,
        linear_heads: bool = False,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.temperature_query, self.temperature_neighbor = float(temperature_query), float(temperature_neighbor)
        self.negative_weight, self.symmetric_loss = float(negative_weight), bool(symmetric_loss)
        self.image_encoder = encoder  # fine-tuned end to end (finetune_encoder=True); None on frozen features
        self.use_neighbor_context = use_neighbor_context
        self.image_proj = ProjectionHead(n_features, dim, dropout=dropout)
        if linear_heads:  # NH2ST's exp_encoder: two Linear layers, nothing between them
            self.gene_encoder = nn.Sequential(nn.Linear(n_genes, dim), nn.Linear(dim, dim))
        else:
            self.gene_encoder = nn.Sequential(
                nn.Linear(n_genes, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
            )
        self.image_hypergraph = nn.ModuleList([_HypergraphBlock(dim, dropout) for _ in range(hypergraph_layers)])
        self.gene_hypergraph = nn.ModuleList([_HypergraphBlock(dim, dropout) for _ in range(hypergraph_layers)])
        self.query_image_attn = _CrossAttention(dim, n_heads, attn_dropout)  # image attends to gene
        self.query_gene_attn = _CrossAttention(dim, n_heads, attn_dropout)  # gene attends to image
        self.neighbor_image_attn = _CrossAttention(dim, n_heads, attn_dropout)
        self.neighbor_gene_attn = _CrossAttention(dim, n_heads, attn_dropout)
        in_dim = 2 * dim if use_neighbor_context else dim
        if linear_heads:  # NH2ST's Decoder: Linear(512, 256) -> Linear(256, genes), no activation
            hidden = max(1, dim // 2)
            self.regressor = nn.Sequential(nn.Linear(in_dim, hidden), nn.Linear(hidden, n_genes))
        else:
            self.regressor = nn.Sequential(
                nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, n_genes)
            )
        # Image features are z-scored with the training spots' frozen-feature mean and std (set by NH2ST._fit, saved).
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_proj((features.float() - self.feature_mean) / self.feature_std)

    def encode_nodes(self, patches: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """Features ``(B, m, D)`` of every neighbourhood node from the patches ``(U, 3, H, W)`` of the distinct nodes."""
        assert self.image_encoder is not None, "encode_nodes needs the fine-tuned image encoder"
        return self.image_encoder(patches)[inverse]

    @staticmethod
    def _aggregate(blocks: nn.ModuleList, x: torch.Tensor, incidence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask.to(x.dtype).unsqueeze(-1)
        for block in blocks:
            x = block(x, incidence, mask)
        return x

    def _regress(
        self, image_tokens: torch.Tensor, image_nodes: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        target = image_tokens[:, 0]
        if not self.use_neighbor_context or image_nodes is None:
            return self.regressor(target)
        return self.regressor(torch.cat([target, _masked_mean(image_nodes, mask)], dim=-1))

    def predict(self, features: torch.Tensor, incidence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Expression of each neighbourhood's target spot from images only.

        ``features`` ``(B, m, D)`` are the frozen features of the target (node 0) and its neighbours.
        """
        if not self.use_neighbor_context:
            return self.regressor(self._project(features[:, 0]))
        image = self._project(features)
        nodes = self._aggregate(self.image_hypergraph, image, incidence, mask)
        return self._regress(image, nodes, mask)

    def losses(self, batch, data, gather) -> dict[str, torch.Tensor]:
        """The three training losses of a batch of neighbourhoods (``data``: nodes, incidence, mask, target, features).

        When the encoder is fine-tuned, ``batch["x"]`` holds the patches of the batch's distinct nodes.
        """
        index = batch["index"]
        nodes = data["nodes"][index]
        features = self.encode_nodes(batch["x"], batch["inverse"]) if "x" in batch else data["features"][nodes]
        return self.neighbourhood_losses(features, data["target"][nodes], data["incidence"][index], data["mask"][index])

    def neighbourhood_losses(
        self, features: torch.Tensor, expression: torch.Tensor, incidence: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The three training losses for a batch of neighbourhoods.

        ``features`` ``(B, m, D)``, ``expression`` ``(B, m, G)`` (node 0 is the target spot),
        ``incidence`` ``(B, m, m)``, ``mask`` ``(B, m)``. Returns ``nce_query``, ``nce_neighbor`` and ``mse``.
        """
        padding = ~mask
        image = self._project(features)
        gene = self.gene_encoder(expression)
        # Query scale: the target spot's image and expression tokens refine each other.
        q_img, q_gene = image[:, :1], gene[:, :1]
        z_img = self.query_image_attn(q_img, q_gene)[:, 0]
        z_gene = self.query_gene_attn(q_gene, q_img)[:, 0]
        w, sym = self.negative_weight, self.symmetric_loss
        nce_query = info_nce(z_img, z_gene, temperature=self.temperature_query, negative_weight=w, symmetric=sym)
        # Neighbour scale: hypergraph aggregation over the neighbourhood, cross-attention, then a mean.
        img_nodes = self._aggregate(self.image_hypergraph, image, incidence, mask)
        gene_nodes = self._aggregate(self.gene_hypergraph, gene, incidence, mask)
        u_img = _masked_mean(self.neighbor_image_attn(img_nodes, gene_nodes, padding), mask)
        u_gene = _masked_mean(self.neighbor_gene_attn(gene_nodes, img_nodes, padding), mask)
        nce_neighbor = info_nce(u_img, u_gene, temperature=self.temperature_neighbor, negative_weight=w, symmetric=sym)
        # Regression from the target's image embedding (and the image-only neighbourhood context).
        pred = self._regress(image, img_nodes, mask)
        mse = F.mse_loss(pred.float(), expression[:, 0].float())
        return {"nce_query": nce_query, "nce_neighbor": nce_neighbor, "mse": mse}


@register_model("nh2st")
class NH2ST(FinetunableExpressionModel):
    """NH2ST (Qu et al., MICCAI 2025): dual-scale image-expression contrastive learning with neighbourhoods.

    Train it with ``stexp.tl.fit(adata, model="nh2st", ...)``; every hyper-parameter below is a
    keyword of ``fit``.

    Design
        *Query branch*: the target spot's frozen image features go through a projection head
        (Linear-GELU-Linear, residual, LayerNorm) into ``dim``; its expression through the gene
        encoder (two linear layers, no activation between them, as NH2ST's ``exp_encoder``).
        *Neighbour branch*: the target and its ``n_neighbors`` nearest spots of the same slide
        (:func:`stexp.models._neighbors.spatial_neighbors`, in µm) are the nodes of a k-NN hypergraph:
        each node spans a hyperedge with its ``hyperedge_k`` most similar nodes by cosine similarity
        of their image features (``hypergraph_on="features"``, NH2ST's ``build_hypergraph``; the
        frozen features from ``obsm``, also when the encoder is fine-tuned) or nearest in µm
        (``"space"``), on which ``hypergraph_layers`` HGNN convolutions aggregate the image tokens and,
        separately, the gene tokens. At each scale, cross-attention (``nn.MultiheadAttention``) lets
        the image tokens attend to the gene tokens and then the gene tokens attend to the image
        tokens; the attended tokens are averaged over the neighbourhood. Losses: InfoNCE between
        the attended image and gene embeddings at the query scale (``weight_query``) and the
        neighbour scale (``weight_neighbor``), as NH2ST's ``contrastive_loss``: image -> gene only
        (``symmetric_loss=False``) with the negative logits scaled by ``negative_weight=0.1``; plus
        the MSE of a regression head (``weight_mse``; ``Linear(dim//2)-Linear``, NH2ST's ``Decoder``)
        that predicts the target's expression from its image embedding.

    Prediction
        Images only: the regression head applied to the target's image embedding and, with
        ``use_neighbor_context=True`` (default), the mean of its neighbourhood's hypergraph-aggregated
        image tokens. The neighbours' images exist at test time and expression is spatially smooth,
        so the context is legitimate and denoises single-patch features (measured on synthetic
        and HER2+ data; see the project's notes). Neighbourhoods are searched among the spots given
        to ``predict``. Measured expression is never used. The spread is ``None`` unless
        ``mc_samples > 0``: then it is the standard deviation over that many Monte-Carlo dropout
        passes (the mean stays the deterministic prediction).

    Hyper-parameters (the keyword arguments of ``__init__``; ``default_hparams``)
        Paper defaults (NH2ST's public configuration): ``dim=512``, ``n_heads=8``, ``n_neighbors=8``
        (9-spot neighbourhoods), ``temperature_query = temperature_neighbor = 0.05``, loss weights
        1.0 / 0.5 / 1.0, ``lr=5e-4`` with Adam, ``max_epochs=200``, early stopping patience 20 on the
        validation loss (when ``validation=`` is given), ``hyperedge_k=3``, ``hypergraph_layers=2``
        (NH2ST's ``HGNN``: two ``HypergraphConv`` layers), ``negative_weight=0.1``,
        ``symmetric_loss=False``, ``weight_decay=0`` (Adam without decay), ``linear_heads=True``,
        ``hypergraph_on="features"``. Chosen here (the paper does not say, or works on pixels):
        ``dropout=0.1`` (the paper's 0.5 belongs to its cross-attention blocks on 7x7 feature maps; on
        frozen features it underfits), ``attn_dropout=0.1``, ``batch_size=128`` (the paper's 8 is for
        end-to-end ResNet-18 training; contrastive losses need more negatives), AdamW. Folders saved
        before these defaults (issue 27) load with the architecture they were trained with.

    Deviations from the official code (the full audit: ``docs/methods.md``)
        Frozen features replace the end-to-end ResNet-18 by default. ``finetune_encoder=True`` trains
        the encoder that made the features (rebuilt from their spec, e.g. EfficientNet-Lite0 or a
        timm ResNet-18) end to end on augmented patches (flips, 90° rotations, colour jitter;
        ``augment``; HED stain jitter with ``hed_jitter``), at ``encoder_lr`` (``None``: ``lr``); each batch runs the encoder once per
        distinct spot of its neighbourhoods (about ``batch_size x (n_neighbors + 1)`` patches, so lower
        ``batch_size`` on a small GPU; the paper used 8). GPU advised; it also runs on a CPU for tiny
        data. Prediction then embeds the query patches with the fine-tuned encoder (obsm features
        are not read). Cross-attention
        has no residual, and the gene tokens attend to the *unrefined* image tokens: otherwise both
        sides of the contrastive loss would carry the gene information only. The neighbourhood is the
        ``n_neighbors`` nearest spots in µm, not a square window of patches.
    """

    def __init__(
        self,
        genes: list[str],
        *,
        n_neighbors: int = 8,
        hyperedge_k: int = 3,
        hypergraph_layers: int = 2,
        hypergraph_on: Literal["features", "space"] = "features",
        dim: int = 512,
        n_heads: int = 8,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        temperature_query: float = 0.05,
        temperature_neighbor: float = 0.05,
        weight_query: float = 1.0,
        weight_neighbor: float = 0.5,
        weight_mse: float = 1.0,
        negative_weight: float = 0.1,
        symmetric_loss: bool = False,
        linear_heads: bool = True,
        use_neighbor_context: bool = True,
        mc_samples: int = 0,
        max_epochs: int = 200,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        early_stopping_patience: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            n_neighbors=n_neighbors,
            hyperedge_k=hyperedge_k,
            hypergraph_layers=hypergraph_layers,
            hypergraph_on=hypergraph_on,
            dim=dim,
            n_heads=n_heads,
            dropout=dropout,
            attn_dropout=attn_dropout,
            temperature_query=temperature_query,
            temperature_neighbor=temperature_neighbor,
            weight_query=weight_query,
            weight_neighbor=weight_neighbor,
            weight_mse=weight_mse,
            negative_weight=negative_weight,
            symmetric_loss=symmetric_loss,
            linear_heads=linear_heads,
            use_neighbor_context=use_neighbor_context,
            mc_samples=mc_samples,
            max_epochs=max_epochs,
            lr=lr,
            weight_decay=weight_decay,
            early_stopping_patience=early_stopping_patience,
            **kwargs,
        )
        hp = self.hparams
        check_hparams(
            self,
            non_negative_int=("n_neighbors", "hyperedge_k", "hypergraph_layers", "mc_samples"),
            positive_int=("dim", "n_heads"),
            positive=("temperature_query", "temperature_neighbor"),
            non_negative=("weight_query", "weight_neighbor", "weight_mse", "negative_weight"),
            fraction=("dropout", "attn_dropout"),
        )
        if hp["dim"] % hp["n_heads"]:
            raise ValueError(f"nh2st: dim={hp['dim']} must be divisible by n_heads={hp['n_heads']}.")
        if hp["hypergraph_on"] not in ("features", "space"):
            raise ValueError(f"nh2st: hypergraph_on must be 'features' or 'space', got {hp['hypergraph_on']!r}.")
        if hp["weight_mse"] == 0:
            raise ValueError("nh2st: weight_mse=0 would leave the regression head, which predicts, untrained.")

    # -- the network and its data -------------------------------------------------------------
    def build_network(self, *, n_features: int, encoder: nn.Module | None, **sizes: int) -> NH2STNetwork:
        hp = self.hparams
        return NH2STNetwork(
            n_features,
            len(self.genes),
            dim=hp["dim"],
            n_heads=hp["n_heads"],
            hypergraph_layers=hp["hypergraph_layers"],
            dropout=hp["dropout"],
            attn_dropout=hp["attn_dropout"],
            use_neighbor_context=hp["use_neighbor_context"],
            temperature_query=hp["temperature_query"],
            temperature_neighbor=hp["temperature_neighbor"],
            negative_weight=hp["negative_weight"],
            symmetric_loss=hp["symmetric_loss"],
            linear_heads=hp["linear_heads"],
            encoder=encoder,
        )

    def loss_weights(self) -> dict[str, float]:
        hp = self.hparams
        return {"nce_query": hp["weight_query"], "nce_neighbor": hp["weight_neighbor"], "mse": hp["weight_mse"]}

    def _graph(self, data: SpotData) -> dict[str, torch.Tensor]:
        """Neighbourhoods and their hypergraphs for the spots of ``data``, as tensors."""
        nodes, node_mask = neighborhoods(data.coords_um, data.library, k=self.hparams["n_neighbors"])
        if self.hparams["hypergraph_on"] == "features":
            incidence = hypergraph_from_distances(
                feature_distances(data.features, nodes), node_mask, k=self.hparams["hyperedge_k"]
            )
        else:
            incidence = knn_hypergraph(data.coords_um, nodes, node_mask, k=self.hparams["hyperedge_k"])
        return {
            "nodes": torch.from_numpy(nodes),
            "mask": torch.from_numpy(node_mask),
            "incidence": torch.from_numpy(incidence),
        }

    def training_tensors(self, data: SpotData) -> dict[str, torch.Tensor]:
        return {**super().training_tensors(data), **self._graph(data)}

    def node_index(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["nodes"]

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        if "net.gene_encoder.3.weight" in state:  # saved before issue 27: non-linear heads, hypergraph in µm
            self.hparams.update(linear_heads=False, hypergraph_on="space")
        super()._load_state(state)

    def initialise(self, network: Any, train: SpotData) -> None:
        super().initialise(network, train)
        # Start the regression head at the training mean: the MSE then starts at the variance.
        network.regressor[-1].bias.copy_(as_tensor(train.target).mean(0))

    # -- ExpressionModel ----------------------------------------------------------------------
    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        graph = self._graph(data)
        mc = self.hparams["mc_samples"]
        means, spreads = [], []
        chunk = 1024
        with self.on_device() as (net, device), torch.no_grad():
            features = self.image_features(data, device)
            for start in range(0, data.n_spots, chunk):
                nodes = graph["nodes"][start : start + chunk]
                args = (
                    features[nodes].to(device),
                    graph["incidence"][start : start + chunk].to(device),
                    graph["mask"][start : start + chunk].to(device),
                )
                net.eval()
                means.append(net.predict(*args).float().cpu())
                if mc:
                    net.train()  # dropout on: Monte-Carlo samples
                    with torch.random.fork_rng(devices=[] if device == "cpu" else None):
                        torch.manual_seed(self.hparams["seed"] + start)
                        samples = torch.stack([net.predict(*args).float() for _ in range(mc)])
                    spreads.append(samples.std(0, correction=0).cpu())
        mean = torch.cat(means).numpy()
        return mean, (torch.cat(spreads).numpy() if mc else None)
