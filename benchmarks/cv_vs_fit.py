"""HER2+ LOPO: ``stexp.tl.cross_validate()`` (the default pipeline) against fit/predict/evaluate by hand.

The two must agree exactly (one fit path). Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/cv_vs_fit.py
"""

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import stexp

DATA = Path(os.environ.get("STEXP_DATA_DIR", "../shared/data")) / "her2st"

stexp.settings.verbosity = 1
t0 = time.perf_counter()
adata = stexp.datasets.her2st(["B4", "C2", "C3", "C4", "C5", "C6"], path=DATA)
panel = [g.strip() for g in (DATA / "her2st_785_genes.txt").read_text().split() if g.strip()]
genes = [g for g in panel if g in adata.var_names]
stexp.pp.embed_images(adata)
key = [k for k in adata.obsm if k.startswith("X_stexp")][0]
t1 = time.perf_counter()
res = stexp.tl.cross_validate(adata, features_key=key, genes=genes, coverage=0.9)
t2 = time.perf_counter()
print(
    res.per_fold[["library_id", "pcc_acg", "pcc_heg", "coverage", "interval_width", "expected_pcc_spearman"]].round(4)
)
print("cross_validate() ACG", round(res.per_fold.pcc_acg.mean(), 4), "in", round(t2 - t1, 1), "s")
hand = []
for patient in ["B", "C"]:
    is_test = (adata.obs["patient"].astype(str) == patient).to_numpy()
    train, test = adata[~is_test].copy(), adata[is_test].copy()
    m = stexp.tl.fit(train, features_key=key, genes=genes)
    stexp.tl.predict(test, m, coverage=0.9)
    hand.append(stexp.tl.evaluate(test))
hand = pd.concat(hand)
print(hand[["pcc_acg", "pcc_heg", "coverage", "interval_width"]].round(4))
print(
    "by hand ACG",
    round(hand.pcc_acg.mean(), 4),
    "max |diff|",
    float(np.abs(res.per_fold.set_index("library_id").loc[hand.index, "pcc_acg"] - hand["pcc_acg"]).max()),
)
