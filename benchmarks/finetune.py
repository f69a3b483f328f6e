"""HER2+ fine-tuning benchmark: EfficientNet-Lite0 trained end to end on CPU, against its frozen features.

Same sections, 785-gene panel and leave-one-patient-out folds as ``benchmarks/her2st.py``. For each
fold, one model (``--model``, default ``mclstexp_plus``) is trained twice for ``--epochs`` epochs:

- ``frozen``: on the frozen features of ``stexp.pp.embed_images(adata)`` (the default encoder
  ``efficientnet_lite0_ml`` on 75 µm patches);
- ``finetuned``: the same model with ``finetune_encoder=True``: the encoder that made those features
  is rebuilt from their spec and trained with the heads on augmented patches (flips, 90° rotations,
  colour jitter), ``encoder_lr`` 1e-5;
- ``finetuned_hed``: the same with HED stain augmentation of the training patches (``hed_jitter``,
  ``--hed-jitter``, default 0.05: Tellez et al.'s "HED-light").

Each model predicts the held-out slides twice: from their images (``pcc_acg``) and from the images
with the stain-shift protocol's fixed HED perturbation (``pcc_acg_stain``, as ``her2st.py --protocols
stain``), which HED augmentation is meant to withstand.

Reports PCC(ACG) per test slide, fit seconds (and per epoch) and peak RSS. One run, measured once (the
issue asks for time and accuracy of CPU fine-tuning; it is not part of the default pipeline).

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/finetune.py --epochs 3

Writes ``benchmarks/results/finetune.json`` and ``finetune.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
from _memory import peak_rss_mb

sys.path.insert(0, str(Path(__file__).parent))
import her2st  # (sections and data folder shared with the main benchmark)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="her2st folder or its parent (default: $STEXP_DATA_DIR)")
    parser.add_argument("--model", default="mclstexp_plus")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--encoder-lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", default="frozen,finetuned,finetuned_hed")
    parser.add_argument("--hed-jitter", type=float, default=0.05, help="hed_jitter of the finetuned_hed mode")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    import torch

    import stexp

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stexp.settings.verbosity = 1
    her2st_dir = her2st._data_dir(args.data_dir)
    adata = stexp.datasets.her2st(her2st.SECTIONS, path=her2st_dir)
    stexp.pp.embed_images(adata)  # the default features (cached on disk)
    key = next(iter(adata.uns["stexp"]["features"]))
    panel = (her2st_dir / "her2st_785_genes.txt").read_text().split()
    genes = [g for g in panel if g in adata.var_names]
    patients = adata.obs["patient"].astype(str).to_numpy()
    rows, fit_seconds = [], {}
    # each held-out patient's slides as they are and stain-shifted (their frozen features embedded once, cached)
    tests = {}
    for patient in dict.fromkeys(patients):
        test = adata[patients == patient].copy()
        stained = her2st._image_variant(test, "stain")
        stexp.pp.embed_images(stained, key_added=key, overwrite=True)
        tests[patient] = {"clean": test, "stain": stained}
    modes = {
        "frozen": {},
        "finetuned": {"finetune_encoder": True, "encoder_lr": args.encoder_lr},
        "finetuned_hed": {"finetune_encoder": True, "encoder_lr": args.encoder_lr, "hed_jitter": args.hed_jitter},
    }
    for mode in args.modes.split(","):
        params = {"max_epochs": args.epochs, "batch_size": args.batch_size, "device": "cpu", **modes[mode]}
        for patient in dict.fromkeys(patients):
            train = adata[patients != patient]  # fit reads a view
            t0 = time.perf_counter()
            model = stexp.tl.fit(train, model=args.model, features_key=key, genes=genes, calibrate=False, **params)
            fit_s = fit_seconds[(mode, patient)] = time.perf_counter() - t0
            epochs_run = len(model.history.get("train_loss", [])) or args.epochs
            scores = {}
            for image, view in tests[patient].items():  # a fine-tuned model reads the images, a frozen one the features
                stexp.tl.predict(view, model, key_added="ft_pred")
                scores[image] = stexp.tl.evaluate(view, pred_key="ft_pred", library_key="library_id", top_n=50)
            for lib, r in scores["clean"].iterrows():
                rows.append(
                    {
                        "mode": mode,
                        "test_patient": patient,
                        "library_id": lib,
                        "pcc_acg": float(r["pcc_acg"]),
                        "pcc_acg_stain": float(scores["stain"].loc[lib, "pcc_acg"]),
                        "mse": float(r["mse"]),
                        "fit_seconds": fit_s,
                        "seconds_per_epoch": fit_s / epochs_run,
                        "n_train_spots": int(train.n_obs),
                    }
                )
            print(f"{mode:13s} test {patient}: fit {fit_s:.0f} s, peak {peak_rss_mb():.0f} MB", flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("mode").agg(
        pcc_acg=("pcc_acg", "mean"),
        pcc_acg_std=("pcc_acg", "std"),
        pcc_acg_stain=("pcc_acg_stain", "mean"),
        pcc_acg_stain_std=("pcc_acg_stain", "std"),
        mse=("mse", "mean"),
    )
    summary["fit_seconds"] = [sum(t for (m, _), t in fit_seconds.items() if m == mode) for mode in summary.index]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "features": key,
        "epochs": args.epochs,
        "encoder_lr": args.encoder_lr,
        "hed_jitter": args.hed_jitter,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, no GPU used",
        "peak_rss_mb": peak_rss_mb(),
        "per_slide": rows,
        "summary": json.loads(summary.reset_index().to_json(orient="records")),
    }
    (out / "finetune.json").write_text(json.dumps(info, indent=1))
    text = "\n".join(
        [
            "# HER2+ fine-tuning on CPU (leave-one-patient-out)",
            "",
            f"Command: `{info['command']}`  ",
            f"Model `{args.model}`, {args.epochs} epochs, batch {args.batch_size}, encoder lr {args.encoder_lr:g}, "
            f"hed_jitter {args.hed_jitter:g} (finetuned_hed); "
            f"features `{key}`; {info['machine']}; peak RSS {info['peak_rss_mb']:.0f} MB.",
            "",
            summary.round(4).to_markdown(),
            "",
            table.pivot_table(index="library_id", columns="mode", values=["pcc_acg", "pcc_acg_stain"])
            .round(3)
            .to_markdown(),
            "",
        ]
    )
    (out / "finetune.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
