#!/usr/bin/env python
"""Train the ifi-seg segmentation network.

    python train.py --data COHORT_DIR_or_CSV --out RUN_DIR [--epochs E] [--minutes M]
                    [--val-fraction F] [--seed S] [--resume] [--device auto|cpu|cuda] [--init BUNDLE]

Data layout, augmentation and outputs: see ``pipeline/training.py``. The result is
``RUN_DIR/best.safetensors`` + ``RUN_DIR/best.json`` (copy them to
``models/ifi_seg_default.*`` to make them the bundled default), ``RUN_DIR/last.*``,
``RUN_DIR/checkpoint.pt`` (for ``--resume``), ``RUN_DIR/log.csv`` and ``RUN_DIR/log.txt``.
Then ``python -m pipeline.calibrate --model RUN_DIR/best.safetensors --data HELD_OUT`` fits the
per-class logit offsets on annotated scans kept out of training (see ``pipeline/calibrate.py``).

On Linux, if tcmalloc (Debian package ``libtcmalloc-minimal4``) is installed, the command
re-executes itself with it preloaded: on small VMs glibc's allocator makes CPU training several
times slower (see docs / shared notes). ``--no-tcmalloc`` disables this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cohort folder with cohort.csv, or a CSV subject,t1,fluid,labels")
    ap.add_argument("--out", required=True, help="run folder (bundles, logs, checkpoint, cache)")
    ap.add_argument("--epochs", type=int, default=1000, help="maximum number of epochs")
    ap.add_argument("--minutes", type=float, default=None, help="time budget; training stops cleanly after it")
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2, help="patches per step")
    ap.add_argument("--patches-per-subject", type=int, default=2,
                    help="patches drawn from each subject of a step (divides --batch)")
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 16], help="patch size in working voxels")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--max-val", type=int, default=8, help="cap on the number of validation subjects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last + checkpoint.pt")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--init", default=None, help="start from this bundle's weights (fine-tuning)")
    ap.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--class-weight", action="append", default=[], metavar="NAME=W",
                    help="loss weight of one structure (repeatable), e.g. hamstring_tendon=3; others 1")
    ap.add_argument("--contact-weight", type=float, default=1.0, metavar="W",
                    help="cross-entropy weight where the measured structures touch (hamstring origin on "
                         "the ischial tuberosity, QF on the lesser trochanter...); 1 = off")
    ap.add_argument("--tissue-contrast", type=float, default=0.0, metavar="P",
                    help="probability per patch of another scanner's tissue contrast (each tissue class "
                         "scaled by its own factor, 0.5-2); 0 (default) leaves it out, as the bundled models were trained")
    ap.add_argument("--other-plane", type=float, default=0.0, metavar="P",
                    help="probability per patch that one channel looks acquired coronal or sagittal "
                         "(3-5 mm slices along A-P or L-R, sometimes only a slab); 0 (default) leaves it out")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    ap.add_argument("--unannotated", choices=["auto", "pseudo", "marginal"], default="auto",
                    help="subjects whose label table names only some structures: 'pseudo' completes "
                         "their maps with a model's output (--pseudo-labels-from, else --init), "
                         "'marginal' leaves the rest to the marginal loss; 'auto' (default): pseudo "
                         "when there is such a model, else marginal")
    ap.add_argument("--pseudo-labels-from", default=None, metavar="BUNDLE",
                    help="the model whose output completes partial maps (default: --init), e.g. "
                         "models/ifi_seg_default.safetensors when training from scratch")
    ap.add_argument("--description", default=None,
                    help='training data description for the metadata, e.g. "synthetic phantoms: '
                         'data_scripts/make_phantoms.py --n 150 --seed 1"')
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-tcmalloc", action="store_true", help="do not re-execute with tcmalloc preloaded")
    a = ap.parse_args(argv)
    a.class_weights = _class_weights(ap, a.class_weight)
    for flag, p in (("--tissue-contrast", a.tissue_contrast), ("--other-plane", a.other_plane)):
        if not 0.0 <= p <= 1.0:
            ap.error(f"{flag} {p}: a probability, 0 to 1")
    return a


def _class_weights(ap: argparse.ArgumentParser, items: list[str]) -> dict:
    """``["name=w", ...]`` -> ``{name: w}``; a malformed item is a usage error."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            ap.error(f"--class-weight {item!r}: expected NAME=NUMBER, e.g. hamstring_tendon=3")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline.training import TrainConfig, run_training

    cfg = TrainConfig(data=a.data, out=a.out, epochs=a.epochs, minutes=a.minutes,
                      steps_per_epoch=a.steps_per_epoch, batch=a.batch,
                      patches_per_subject=a.patches_per_subject, patch=tuple(a.patch), lr=a.lr,
                      val_fraction=a.val_fraction, max_val=a.max_val, seed=a.seed, resume=a.resume,
                      device=a.device, init=a.init, workers=a.workers, bf16=a.bf16, threads=a.threads,
                      class_weights=a.class_weights, contact_weight=a.contact_weight, tissue_contrast=a.tissue_contrast,
                      other_plane=a.other_plane, progress=not a.no_progress, description=a.description,
                      unannotated=a.unannotated, pseudo_labels_from=a.pseudo_labels_from)
    summary = run_training(cfg)
    print(f"done: {summary['epochs']} epochs, best key-structure Dice {summary['best_key_dice']:.4f}, "
          f"{summary['elapsed_min']:.1f} min -> {summary['run_dir']}/best.safetensors")
    print(f"next (optional): python -m pipeline.calibrate --model {summary['run_dir']}/best.safetensors "
          "--data ANNOTATED_SCANS_KEPT_OUT_OF_TRAINING")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline.runtime import reexec_with_tcmalloc

    reexec_with_tcmalloc(__file__, sys.argv[1:])
    sys.exit(main())
