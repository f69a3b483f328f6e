"""``EncoderSpec``: how image features were made, recorded with them and with every model trained on them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

#: What ``embed_images`` did to the patches besides cutting them (absent in records older than these options).
VIEW_FIELDS = ("mpp", "stain_norm", "tta", "adapt_bn", "jpeg_quality", "deblock")
#: Fields a model's features and the query's features must share (and the view options, :data:`CHECKED_FIELDS`).
MODEL_FIELDS = ("encoder", "weights", "encoder_kwargs", "patch_um", "patch_px", "normalization")
#: What :meth:`EncoderSpec.diff` compares by default.
CHECKED_FIELDS = (*MODEL_FIELDS, *VIEW_FIELDS)
#: Fields that decide whether stored features are up to date (the model's fields and the output width).
FEATURE_FIELDS = (*MODEL_FIELDS, "out_dim")
#: Fields recorded only when set (``None`` means "none given"; records older than the field lack it).
OPTIONAL_FIELDS = ("encoder_kwargs",)


def _none(value: Any) -> Any:
    """``None`` for the string ``"None"`` that stexp < 0.2 wrote into ``uns`` for a missing value."""
    return None if isinstance(value, str) and value == "None" else value


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers up to float rounding, mappings key by key."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(map(str, a)) != set(map(str, b)):
            return False
        bb = {str(k): v for k, v in b.items()}
        return all(_same(v, bb[str(k)]) for k, v in a.items())
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


@dataclass(frozen=True)
class EncoderSpec:
    """How a set of image features was made.

    Attributes
    ----------
    encoder
        Encoder name (``"efficientnet_lite0"``, ``"timm:<model>"``, ``"callable:<qualname>"``...).
    weights
        Identity of the weights (``"imagenet"``, ``"random"``, ``"sha256:..."``).
    weights_arg
        What rebuilds the encoder as ``weights=`` of :func:`stexp.images.build_encoder` (``"imagenet"``,
        a file path, or ``None`` for random weights / callables).
    patch_um
        Patch side in µm: one number, or one per library.
    patch_px
        Encoder input side in pixels.
    normalization
        The encoder's input normalisation.
    out_dim
        Feature width.
    library_key
        The ``obs`` column of the libraries the features were computed for.
    encoder_kwargs
        Extra ``timm.create_model`` arguments as canonical JSON (a string, so ``uns`` can hold it in h5ad;
        classes are written as ``{"__import__": "<module>.<qualname>"}``); ``None`` when there were none
        (records written before the field existed read back as ``None``).
    mpp
        µm per pixel every slide was resampled to before cutting patches (``None``: its own).
    stain_norm
        Stain normalisation of the patches (``None``, ``"reinhard"``, ``"macenko"``, ``"vahadane"`` or
        ``"haematoxylin"``).
    tta
        Whether the features are averaged over the 8 flips/rotations of each patch.
    adapt_bn
        Whether the encoder's BatchNorm statistics were re-estimated on each slide's own patches before
        embedding it (AdaBN; records older than the option read back as ``False``).
    jpeg_quality
        JPEG quality every slide was re-encoded at (after the ``mpp`` resampling) before its patches were cut
        (``None``: none; records older than the option read back as ``None``).
    deblock
        Whether a decoded slide with heavy JPEG block artefacts was deblocked before its patches were cut
        (records older than the option read back as ``False``: nothing was).
    """

    encoder: str | None = None
    weights: str | None = None
    weights_arg: str | None = None
    patch_um: float | dict[str, float] | None = None
    patch_px: int | None = None
    normalization: str | None = None
    out_dim: int | None = None
    library_key: str | None = None
    encoder_kwargs: str | None = None
    mpp: float | None = None
    stain_norm: str | None = None
    tta: bool = False
    adapt_bn: bool = False
    jpeg_quality: int | None = None
    deblock: bool = False

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | EncoderSpec | None) -> EncoderSpec:
        """From ``uns["stexp"]["features"][key]`` or a model's JSON (other keys are ignored)."""
        if isinstance(mapping, EncoderSpec):
            return mapping
        mapping = mapping or {}
        values = {f.name: _none(mapping.get(f.name)) for f in fields(cls)}
        if isinstance(values["patch_um"], Mapping):
            values["patch_um"] = {str(k): float(v) for k, v in values["patch_um"].items()}
        elif values["patch_um"] is not None:
            values["patch_um"] = float(values["patch_um"])
        if isinstance(values["encoder_kwargs"], Mapping):  # a dict given by hand: canonical JSON like the records
            import json

            values["encoder_kwargs"] = json.dumps(dict(values["encoder_kwargs"]), sort_keys=True, separators=(",", ":"))
        values["encoder_kwargs"] = values["encoder_kwargs"] or None  # "" / {} mean no arguments
        for key in ("patch_px", "out_dim"):
            if values[key] is not None:
                values[key] = int(values[key])
        # records written before the view options existed lack them: the defaults
        values["mpp"] = None if values["mpp"] is None else float(values["mpp"])
        values["tta"] = bool(values["tta"]) if values["tta"] is not None else False
        values["adapt_bn"] = bool(values["adapt_bn"]) if values["adapt_bn"] is not None else False
        values["jpeg_quality"] = None if values["jpeg_quality"] is None else int(values["jpeg_quality"])
        values["deblock"] = bool(values["deblock"]) if values["deblock"] is not None else False
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``None`` included (for JSON)."""
        return asdict(self)

    def to_uns(self) -> dict[str, Any]:
        """The fields that are set (h5ad cannot store ``None``; a missing key reads back as ``None``)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __bool__(self) -> bool:
        return self.encoder is not None

    @property
    def patch_um_value(self) -> float | None:
        """The patch side when one number holds for every library, else ``None``."""
        return self.patch_um if isinstance(self.patch_um, float) else None

    def _not_rebuildable(self) -> str | None:
        """Why the encoder cannot be rebuilt from this spec alone, or ``None`` when it can."""
        from stexp.images._encoders import LOCAL_PREFIX, list_encoders

        name = self.encoder
        if not name:
            return "no encoder is recorded (features made without stexp.pp.embed_images carry no spec)"
        if name.startswith("callable:"):
            # also with an encoder_id ("id:<name>" weights): the id names the features for the cache, the
            # module itself is stored nowhere
            return (
                f"encoder {name!r} is a user-given module or callable, which is stored neither with the features "
                "nor with a model; only the same callable, passed to stexp.pp.embed_images, recomputes them"
            )
        if not (name.startswith(("timm:", "hf-hub:", LOCAL_PREFIX)) or name in list_encoders()):
            return (
                f"encoder {name!r} is not a registered encoder (this process has {list_encoders()}; register it "
                "with stexp.images.register_encoder first), 'timm:<model>', 'hf-hub:<org>/<model>' or a local "
                "model folder"
            )
        if self.weights_arg is None and self.weights != "random":
            return (
                f"encoder {name!r}: its weights ({self.weights!r}) are recorded but not what loads them "
                "(weights_arg is missing)"
            )
        return None

    @property
    def rebuildable(self) -> bool:
        """Whether the encoder can be rebuilt from this spec alone, so that :meth:`embed_kwargs` works.

        True for a registry name (:func:`stexp.images.list_encoders`, names added in this process with
        :func:`stexp.images.register_encoder` included), ``"timm:<model>"``, ``"hf-hub:<org>/<model>"`` or
        ``"local-dir:<folder>"`` whose weights argument is recorded (``weights_arg``: ``"imagenet"`` or a
        file) or whose weights are random. False for an empty spec, for a user-given module or callable
        (``"callable:..."``, also when named with ``encoder_id``: its ``"id:..."`` weights identify its
        features for the cache but the module is not stored), and for weights recorded without what loads
        them.

        Files the spec names are not opened here: a weights file or local model folder that is gone is
        reported by :func:`stexp.images.build_encoder` when the encoder is rebuilt, and a file whose content
        changed gives features whose ``weights`` identity differs (the model's spec check then refuses
        them). Random weights are drawn again: the features are the same only for an encoder without
        parameters.
        """
        return self._not_rebuildable() is None

    def embed_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`stexp.pp.embed_images` that recreate these features.

        ``stexp.pp.embed_images(adata, **spec.embed_kwargs())`` on the libraries the features were made
        from computes the same features and records an equal spec; on other slides it computes features
        that a model trained on this spec accepts. Where and how to compute (``library_key``,
        ``key_added``, ``batch_size``, ``device``, ``cache``) are left to the caller.

        Returns
        -------
        ``encoder``, ``weights`` (the recorded ``weights_arg``: ``"imagenet"``, a file path, or ``None`` for
        random weights), ``encoder_kwargs`` (decoded from the recorded JSON, classes imported; ``None`` when
        there were none), ``patch_um`` and the view options (``mpp``, ``stain_norm``, ``tta``, ``adapt_bn``, ``jpeg_quality``, ``deblock``). ``patch_um`` is the recorded
        number, or the per-library mapping when the libraries had different patch sizes (it recreates the
        features of those libraries; ``embed_images`` raises a KeyError naming any other library), or
        ``None`` when none was recorded (each library's default, :func:`stexp.images.default_patch_um`).

        Raises
        ------
        ValueError
            If the encoder cannot be rebuilt from the spec (see :attr:`rebuildable`); the message names the
            encoder and why.
        """
        reason = self._not_rebuildable()
        if reason is not None:
            raise ValueError(f"the image encoder cannot be rebuilt from its spec: {reason}.")
        from stexp.images._encoders import encoder_kwargs_from_json

        patch_um = dict(self.patch_um) if isinstance(self.patch_um, Mapping) else self.patch_um
        return {
            "encoder": self.encoder,
            "weights": self.weights_arg,
            "encoder_kwargs": encoder_kwargs_from_json(self.encoder_kwargs) or None,
            "patch_um": patch_um,
            "mpp": self.mpp,
            "stain_norm": self.stain_norm,
            "tta": self.tta,
            "adapt_bn": self.adapt_bn,
            "jpeg_quality": self.jpeg_quality,
            "deblock": self.deblock,
        }

    def diff(
        self,
        other: EncoderSpec | Mapping[str, Any] | None,
        fields: tuple[str, ...] = CHECKED_FIELDS,
        names: tuple[str, str] = ("model", "data"),
    ) -> list[str]:
        """``"field: <names[0]> value vs <names[1]> value"`` for each of ``fields`` in which the two specs differ."""
        other = EncoderSpec.from_mapping(other)
        return [
            f"{k}: {names[0]} {getattr(self, k)!r} vs {names[1]} {getattr(other, k)!r}"
            for k in fields
            if not _same(getattr(self, k), getattr(other, k))
        ]


def check_encoder_spec(model_spec, data_spec, *, what: str = "model") -> None:
    """Raise a ValueError naming each field in which a model's feature spec and the data's differ.

    Nothing is checked when either spec is empty (features a user brought without a spec).
    """
    model_spec, data_spec = EncoderSpec.from_mapping(model_spec), EncoderSpec.from_mapping(data_spec)
    if not model_spec or not data_spec:
        return
    diffs = model_spec.diff(data_spec)
    if diffs:
        raise ValueError(
            f"{what} was trained on features from another image encoder ({'; '.join(diffs)}). "
            "Embed the data with the model's encoder spec (stexp.pp.embed_images) first."
        )
