"""`bigtransfer convert SRC OUT_DIR`: any BiT checkpoint -> a transformers-layout directory."""

from __future__ import annotations

from ..checkpoints import read_labels
from ..convert import convert_checkpoint
from ..fields import non_negative_int, positive_int
from .options import ModelOptions, add_fields


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a timm, Google .npz, original big_transfer or transformers checkpoint",
        description=(
            "Detect the format of SRC from the file itself (safetensors, torch pickle or .npz; timm, Google, "
            "original big_transfer or transformers key names), infer the architecture from its tensors and write "
            "OUT_DIR with config.json, model.safetensors and the source's preprocessor_config.json. SRC may also "
            "be a Google name (BiT-M-R50x1) or a Hugging Face Hub name (timm/resnetv2_50x1_bit.goog_in21k)."
        ),
    )
    parser.add_argument("source", metavar="SRC", help="weights file, directory, Google BiT name or Hub name")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="directory to write (created if needed)")
    parser.add_argument("--num-labels", type=non_negative_int, metavar="N", help="replace the head with a fresh zero-initialised N-class head")
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line (a new head if their count differs)")
    parser.add_argument("--image-size", type=positive_int, metavar="N", help="evaluation resolution for the preprocessor config")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an OUT_DIR that holds other files (they are kept; the model's are replaced)")
    add_fields(parser, ModelOptions, only=("progress",))
    parser.set_defaults(func=run)


def run(args) -> int:
    labels = read_labels(args.labels) if args.labels else None
    result = convert_checkpoint(
        args.source, args.output_dir, num_labels=args.num_labels, labels=labels, image_size=args.image_size,
        overwrite=args.overwrite, progress=args.progress,
    )
    print(result.summary())
    return 0
