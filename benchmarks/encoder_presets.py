"""Every foundation-model preset, end to end with random weights: build, save as published, load, embed.

For each preset of :func:`stexp.images.list_encoders` that is a foundation model (``uni``, ``uni2``,
``h_optimus_0``, ``virchow2``, ``phikon_v2``; ``conch`` needs MahmoodLab's ``conch`` package and is reported
as skipped without it), with random weights (no network here):

1. build the published architecture with ``stexp.images.build_encoder(name, weights=None)``;
2. save its weights as the published checkpoint would hold them (key names and shapes:
   ``stexp.images._presets.checkpoint_state``; transformers' ``Dinov2Model`` keys for Phikon-v2) in a
   folder under the file name of the repository;
3. load that folder through the preset, ``build_encoder(name, weights=folder)``, and check that it computes
   what the saved network computes;
4. embed a batch of uint8 patches (``Encoder.preprocess`` then the module) and time it.

Reports parameters, output width, load time and patches/s on this CPU (``--threads`` torch threads).
Run with ``nice -n 15`` on a shared machine; the timings then are upper bounds.

Usage::

    nice -n 15 python benchmarks/encoder_presets.py [--presets uni,virchow2] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FOUNDATION = ["uni", "uni2", "h_optimus_0", "virchow2", "phikon_v2", "conch"]


def run(name: str, batch: int, folder: Path) -> dict:
    import stexp.images

    preset = stexp.images.preset_table().loc[name]
    t0 = time.perf_counter()
    try:
        enc = stexp.images.build_encoder(name, weights=None)
    except (ImportError, ValueError) as err:
        return {"preset": name, "status": f"skipped: {str(err).splitlines()[0][:120]}"}
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in enc.module.parameters())
    rng = np.random.default_rng(0)
    px = int(preset["input_px"])
    patches = rng.integers(0, 256, size=(batch, px, px, 3), dtype=np.uint8)
    x = enc.preprocess(patches)
    with torch.inference_mode():
        reference = enc.module(x[:2])
    target = folder / name
    target.mkdir()
    file = target / preset["files"][0]
    state = stexp.images.preset_checkpoint(enc)
    if file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    else:
        torch.save(state, file)
    checkpoint_mb = file.stat().st_size / 2**20
    del state, enc  # one copy of a 1.1 B-parameter model in memory at a time
    gc.collect()
    t0 = time.perf_counter()
    loaded = stexp.images.build_encoder(name, weights=target)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        same = torch.allclose(loaded.module(x[:2]), reference, atol=1e-4, rtol=1e-4)
        loaded.module(x[:1])  # warm-up
        t0 = time.perf_counter()
        out = loaded.module(x)
        embed_s = time.perf_counter() - t0
    file.unlink()
    return {
        "preset": name,
        "status": "ok" if same and out.shape == (batch, preset["out_dim"]) else "MISMATCH",
        "params_m": round(n_params / 1e6, 1),
        "published_params_m": preset["params_m"],
        "out_dim": int(out.shape[1]),
        "card_out_dim": int(preset["out_dim"]),
        "input_px": px,
        "checkpoint_mb": round(checkpoint_mb),
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 1),
        "patches_per_s": round(batch / embed_s, 2),
        "loaded_equals_saved": bool(same),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(FOUNDATION))
    parser.add_argument("--batch", type=int, default=8, help="patches per timed forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            row = run(name, args.batch, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["preset", "status", "params_m", "published_params_m", "out_dim", "input_px", "checkpoint_mb", "load_s",
            "patches_per_s"]  # fmt: skip
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
