"""Fine-tune LiteMedSAM's prompt encoder and mask decoder on the tuning half (issue 27), on cached embeddings.

Data: the tumour cases of ``bench_generalise.SPLIT["tune"]`` only (never the check half), CT and MR.
Every case is prepared exactly as the engine prepares it for the benchmark's 3D-box protocol
(``medsam3d.pipeline``): finite intensities, the window chosen from the prompt box's
intensities, the display orientation, and the zoom crop around the middle-slice box (context
1.0, the default). Each slice of the crop that holds the reference tumour is encoded once by
the model's own encoder (ONNX Runtime on a CPU, as at inference) and its embedding cached
(float16; ``--cache DIR`` keeps them on disk). The orthogonal sections the engine also decodes
are not in the training data.

Training: boxes from each slice's reference mask, loosened by a random 0-15 % of the box size per
side and shifted by up to 5 % (seeded), as the engine's section and chain boxes are loose;
loss = BCE + soft Dice on the logits resized to the crop (as ``LiteMedSAM.decode`` does) + the
MSE between the IoU head's score and the mask's true IoU (the engine's stop rules read that
score). AdamW on the prompt encoder's and mask decoder's parameters, batch 1 with gradients
accumulated over ``--accumulate`` slices. The patients of ``bench_generalise.HOLD_OUT`` are
held back: their loss after each epoch (fixed boxes) picks the epoch kept (early stopping);
epoch 0 is the original decoder, so adapted weights are only written when they beat it there.

Output: ``OUT.pt`` (and ``OUT.last.pt``, the last epoch's, for diagnosis), a weights-only state dict of the adapted tensors (float32; load with
``LiteMedSAM(decoder_weights=OUT.pt)``), and ``OUT.json``: its SHA-256, the base weights'
SHA-256, the training and held-back cases, seed, epochs, per-epoch losses.

Usage: python benchmarks/finetune_decoder.py -o /path/adapted_decoder [--data ../shared/data] [--epochs 8]
           [--lr 5e-5] [--seed 27] [--cache DIR] [--minutes 25]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generalise as bg
from bench_segment import prompts_for


def prepare_case(model, data: Path, case: str) -> dict:
    """The engine's view of one case: its zoomed slices' embeddings and the reference's crops."""
    import medsam3d as m3
    from medsam3d.pipeline import _roi_values, _to_working, _zoom_crop
    from medsam3d.preprocess import apply_window, choose_window, finite_intensities
    from medsam3d.prompts import prompts_from
    from medsam3d.volume import display_axcodes, reorient

    image_path, mask_path = bg.TUMOURS[case]
    volume = m3.load(data / image_path)
    ref = m3.load_labels(data / mask_path, volume).array == 1
    objects = prompts_from(prompts_for(ref)["3d"], volume)
    image, _ = finite_intensities(volume)
    win = choose_window(image, None, None, roi_values=_roi_values(image, objects))
    working, reo = reorient(image, display_axcodes(image))
    images = apply_window(working.array, win)
    ref_w = reo.apply(ref)
    crop = _zoom_crop(_to_working(objects, reo), images.shape[:2], 1.0)
    i0, j0, i1, j1 = crop or (0, 0, images.shape[0] - 1, images.shape[1] - 1)
    ks = np.flatnonzero(ref_w.any(axis=(0, 1)))
    slices = [images[i0 : i1 + 1, j0 : j1 + 1, k].T for k in ks]  # rows = j, columns = i (the engine's)
    masks = [ref_w[i0 : i1 + 1, j0 : j1 + 1, k].T for k in ks]
    features = model.encode(slices)
    return {"case": case, "embeddings": np.concatenate([np.asarray(f[0]) for f in features]).astype(np.float16),
            "resized": [f[1] for f in features], "masks": masks}


def load_cases(model, data: Path, cases: list[str], cache: Path | None) -> list[dict]:
    out = []
    for case in cases:
        path = cache / f"{case}.npz" if cache else None
        if path is not None and path.is_file():
            z = np.load(path)
            n = len(z["embeddings"])
            out.append({"case": case, "embeddings": z["embeddings"], "resized": [tuple(r) for r in z["resized"]],
                        "masks": [z[f"mask{n_}"] for n_ in range(n)]})
        else:
            t0 = time.perf_counter()
            item = prepare_case(model, data, case)
            print(f"encoded {case}: {len(item['masks'])} slices in {time.perf_counter() - t0:.0f} s", flush=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, embeddings=item["embeddings"], resized=np.array(item["resized"]),
                         **{f"mask{n}": m for n, m in enumerate(item["masks"])})
            out.append(item)
    return out


def jittered_box(mask: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """(x0, y0, x1, y1) = (column, row) box of the mask, loosened and shifted at random (rng) or by a
    fixed 5 % each side (None, the held-back evaluation)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)
    size = np.maximum(box[2:] - box[:2] + 1, 4)
    if rng is None:
        grow = np.full(4, 0.05)
        shift = np.zeros(2)
    else:
        grow = rng.uniform(0.0, 0.15, 4)
        shift = rng.uniform(-0.05, 0.05, 2)
    box = box + np.concatenate([-grow[:2] * size, grow[2:] * size]) + np.tile(shift * size, 2)
    h, w = mask.shape
    return np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)


def sample_loss(torch, decoder, embedding, resized, mask, box):
    """Loss of one slice: BCE + soft Dice on the logits at the crop's size, + MSE of the IoU score."""
    from medsam3d.models.litemedsam import INPUT

    F = torch.nn.functional
    h, w = mask.shape
    scale = INPUT / max(h, w)
    logits, iou = decoder(embedding, torch.from_numpy(box[None] * scale))
    nh, nw = resized
    logits = F.interpolate(logits[:, :, :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    target = torch.from_numpy(mask.astype(np.float32))
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    with torch.no_grad():
        pred = logits > 0
        true_iou = (pred & (target > 0)).sum() / ((pred | (target > 0)).sum()).clamp(min=1)
    return bce + dice + F.mse_loss(iou[0, 0], true_iou.float()), float(dice.detach())


def evaluate(torch, decoder, items) -> tuple[float, float]:
    """Mean loss and mean (hard) soft-Dice loss over every held-back slice, fixed boxes."""
    losses, dices = [], []
    with torch.no_grad():
        for item in items:
            for n, mask in enumerate(item["masks"]):
                emb = torch.from_numpy(item["embeddings"][n : n + 1].astype(np.float32))
                loss, dice = sample_loss(torch, decoder, emb, item["resized"][n], mask, jittered_box(mask, None))
                losses.append(float(loss))
                dices.append(dice)
    return float(np.mean(losses)), float(np.mean(dices))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("-o", "--output", type=Path, required=True, help="OUT: writes OUT.pt and OUT.json")
    parser.add_argument("--cache", type=Path, help="keep the embeddings here (npz per case)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--seed", type=int, default=bg.SEED)
    parser.add_argument("--minutes", type=float, default=25.0, help="stop training after this many minutes")
    parser.add_argument("--cases", nargs="*", help=argparse.SUPPRESS)  # a subset (the tests' tiny run)
    args = parser.parse_args(argv)
    import torch

    from medsam3d.models.base import file_sha256
    from medsam3d.models.decoder import BoxDecoder
    from medsam3d.models.litemedsam import ADAPTABLE, LiteMedSAM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tune = [c for c in bg.TUMOURS if bg.half_of(c) == "tune"]
    cases = args.cases or tune
    if any(bg.half_of(c) != "tune" for c in cases):
        raise SystemExit("expected tuning-half cases only")
    held_cases = [c for c in cases if bg.PATIENT[c] in bg.HOLD_OUT]
    train_cases = [c for c in cases if c not in held_cases]
    model = LiteMedSAM(device="cpu")  # the engine's encoder (ONNX Runtime where installed)
    t0 = time.perf_counter()
    items = load_cases(model, args.data, cases, args.cache)
    encode_s = time.perf_counter() - t0
    train = [i for i in items if i["case"] in train_cases]
    held = [i for i in items if i["case"] in held_cases]
    print(f"{sum(len(i['masks']) for i in train)} training slices ({len(train)} cases), "
          f"{sum(len(i['masks']) for i in held)} held back ({len(held)} cases); encoded in {encode_s:.0f} s", flush=True)
    net = model.net
    params = [p for name, p in net.named_parameters() if name.startswith(ADAPTABLE)]
    for p in params:
        p.requires_grad_(True)
    decoder = BoxDecoder(net.prompt_encoder, net.mask_decoder).train()
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    names = [name for name, _ in net.named_parameters() if name.startswith(ADAPTABLE)]
    snapshot = {name: t.detach().clone() for name, t in net.state_dict().items() if name in names}
    best = {"epoch": 0, "state": snapshot}
    history = [dict(zip(("held_loss", "held_dice_loss"), evaluate(torch, decoder.eval(), held)), epoch=0)]
    print(f"epoch 0 (original): held-back loss {history[0]['held_loss']:.4f}", flush=True)
    best_loss = history[0]["held_loss"]
    pairs = [(i, n) for i in train for n in range(len(i["masks"]))]
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        decoder.train()
        order = rng.permutation(len(pairs))
        total = 0.0
        optimiser.zero_grad()
        for step, idx in enumerate(order, 1):
            item, n = pairs[idx]
            emb = torch.from_numpy(item["embeddings"][n : n + 1].astype(np.float32))
            mask = item["masks"][n]
            loss, _ = sample_loss(torch, decoder, emb, item["resized"][n], mask, jittered_box(mask, rng))
            (loss / args.accumulate).backward()
            total += float(loss.detach())
            if step % args.accumulate == 0 or step == len(order):
                optimiser.step()
                optimiser.zero_grad()
        held_loss, held_dice = evaluate(torch, decoder.eval(), held)
        minutes = (time.perf_counter() - t_train) / 60
        history.append({"epoch": epoch, "train_loss": round(total / len(order), 4), "held_loss": round(held_loss, 4),
                        "held_dice_loss": round(held_dice, 4), "minutes": round(minutes, 1)})
        print(f"epoch {epoch}: train {total / len(order):.4f}, held-back {held_loss:.4f} (dice loss {held_dice:.4f}), "
              f"{minutes:.1f} min", flush=True)
        if held_loss < best_loss:
            best_loss = held_loss
            best = {"epoch": epoch, "state": {k: v.detach().clone() for k, v in net.state_dict().items() if k in names}}
        if minutes * (epoch + 1) / epoch > args.minutes:
            print("time budget reached", flush=True)
            break
    out_pt = args.output.with_suffix(".pt")
    out_pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().contiguous() for k, v in best["state"].items()}, out_pt)
    last = {k: v.detach().float().clone() for k, v in net.state_dict().items() if k in names}
    torch.save(last, args.output.with_suffix(".last.pt"))  # the last epoch's, for diagnosis only
    sha = file_sha256(out_pt)
    base_sha = model.weights_sha256
    sidecar = {"file": out_pt.name, "sha256": sha, "base_weights_sha256": base_sha,
               "combined_weights_sha256": hashlib.sha256(f"{base_sha}+{sha}".encode()).hexdigest(),
               "tensors": len(best["state"]), "parameters": int(sum(v.numel() for v in best["state"].values())),
               "train_cases": train_cases, "held_back_cases": held_cases, "hold_out_patients": list(bg.HOLD_OUT),
               "split_seed": bg.SEED, "seed": args.seed, "lr": args.lr, "accumulate": args.accumulate,
               "epochs_run": len(history) - 1, "best_epoch": best["epoch"], "best_held_loss": round(best_loss, 4),
               "original_held_loss": history[0]["held_loss"], "history": history,
               "training_slices": len(pairs), "encode_seconds": round(encode_s, 1),
               "train_minutes": round((time.perf_counter() - t_train) / 60, 1),
               "command": sys.argv, "note": "best_epoch 0 = the original tensors (no epoch beat them held back)"}
    args.output.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"wrote {out_pt} (sha256 {sha[:16]}, epoch {best['epoch']}, held-back loss {best_loss:.4f} vs original "
          f"{history[0]['held_loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
