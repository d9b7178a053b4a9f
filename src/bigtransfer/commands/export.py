"""`bigtransfer export`: a model directory -> ONNX / TorchScript / torch.export file, checked and timed."""

from __future__ import annotations

import numpy as np

from ..checkpoints import loader
from ..data import open_source, spec_paths, whole_split
from ..export import DEFAULT_OPSET, export, time_against_pytorch
from ..fields import DATA_HELP, non_negative_int, positive_int
from ..inference import load_for_inference
from ..modeling import BitBackbone, BitForImageClassification, BitModel
from ..ownership import check_outside_inputs
from ..quantize import quantize


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model to ONNX (checked against onnxruntime), TorchScript or torch.export",
        description="Export a model for deployment, with Weight Standardization folded into the convolutions, "
        "dynamic batch / height / width, checked against the PyTorch model and timed beside it.",
    )
    parser.add_argument("--model", required=True, help="model directory (config.json + weights) or Hub name")
    parser.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "exported-program"),
                        help="onnx (default; checked against onnxruntime), torchscript (.pt) or exported-program (.pt2)")
    parser.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="example image size for tracing (>= 64)")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 18)")
    parser.add_argument("--no-fold", action="store_true", help="keep Weight Standardization as graph ops")
    parser.add_argument("--no-check", action="store_true", help="skip comparing outputs with PyTorch")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed relative output difference")
    parser.add_argument("--time", type=non_negative_int, default=0, metavar="ROUNDS",
                        help="ONNX only: time onnxruntime beside the eager PyTorch model, interleaved, for ROUNDS "
                        "rounds of at least 0.3 s each after the same warm-up (default 0: no timing; `bigtransfer "
                        "bench` times every path properly)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size for --time")
    parser.add_argument("--int8", action="store_true",
                        help="ONNX only: statically quantized int8 (per-channel weights, activations calibrated on "
                        "--calibration images; GroupNorm stays float32), checked for top-1 agreement with float32")
    parser.add_argument("--calibration", metavar="SPEC",
                        help=f"with --int8: images to calibrate and check on (a seeded draw): {DATA_HELP}")
    parser.add_argument("--calibration-images", type=positive_int, default=64, metavar="N",
                        help="with --int8: images that calibrate the activation ranges (default 64)")
    parser.add_argument("--check-images", type=positive_int, default=None, metavar="N",
                        help="with --int8: further images on which int8 and float32 top-1 are compared (default: "
                        "the rest of --calibration, up to 256)")
    parser.set_defaults(func=run)


def run_int8(args) -> int:
    """`export --int8`: calibrate on a seeded draw of --calibration, check on the next --check-images."""
    if args.format != "onnx" or not args.calibration:
        raise ValueError("--int8 writes ONNX (--format onnx) and needs --calibration SPEC (images to calibrate on)")
    check_outside_inputs(args.output, [args.model, *spec_paths(args.calibration)])
    model, processor = load_for_inference(args.model, "cpu")
    source = open_source(args.calibration, whole_split(args.calibration, "train"))
    order = np.random.default_rng(0).permutation(len(source))
    check = args.check_images or min(256, len(source) - args.calibration_images)
    wanted = args.calibration_images + check
    if check < 1 or len(source) < wanted:
        raise ValueError(f"--calibration {args.calibration} has {len(source)} images; --calibration-images "
                         f"{args.calibration_images} + --check-images {check} need {wanted}")

    def pixels(indices) -> np.ndarray:
        return processor([source[int(index)][0] for index in indices], return_tensors="np")["pixel_values"]

    report = quantize(model, args.output, pixels(order[: args.calibration_images]),
                      pixels(order[args.calibration_images : wanted]))
    agreement = f"; top-1 agrees with float32 on {100 * report.top1_agreement:.1f} %" if report.top1_agreement is not None else ""
    print(f"wrote {report.path} (int8: {report.operators.get('QLinearConv', 0)} QLinearConv, calibrated on "
          f"{report.calibration_images} images) in {report.seconds:.0f} s{agreement} of {report.checked_images} "
          f"held-out images; max |output difference| {report.max_abs_difference:.3g}")
    return 0


def run(args) -> int:
    if args.int8:
        return run_int8(args)
    check_outside_inputs(args.output, [args.model])
    model = load_model(args.model)
    report = export(
        model, args.output, args.format, image_size=args.image_size, fold=not args.no_fold,
        opset=args.opset or DEFAULT_OPSET, check=not args.no_check, tolerance=args.tolerance,
    )
    print(f"wrote {report.path} ({args.format}, outputs: {', '.join(report.output_names)}) in {report.seconds:.0f} s")
    if report.operators:
        print("operators: " + ", ".join(f"{name} {count}" for name, count in sorted(report.operators.items())))
    if report.max_abs_difference is not None:
        shapes = ", ".join("x".join(map(str, shape)) for shape in report.checked_shapes)
        print(f"matches PyTorch on {shapes}: max |difference| {report.max_abs_difference:.2e} "
              f"({report.max_relative_difference:.2e} of the largest output; tolerance {args.tolerance:g})")
    if args.format == "onnx" and args.time > 0:
        speed = time_against_pytorch(model, report.path, args.batch_size, args.image_size, rounds=args.time)
        print(f"batch {args.batch_size} at {args.image_size}x{args.image_size}, median of {args.time} interleaved "
              f"rounds: onnxruntime {speed['onnxruntime_images_per_second']:.2f} img/s, eager PyTorch "
              f"{speed['pytorch_images_per_second']:.2f} img/s")
    return 0


def load_model(source: str):
    """The model class named in the checkpoint's config.json `architectures` (BitForImageClassification by
    default, BitModel for a headless checkpoint), in float32: exports are float32 graphs."""
    classes = {cls.__name__: cls for cls in (BitForImageClassification, BitModel, BitBackbone)}
    checkpoint = loader.read(source)
    names = checkpoint.config.get("architectures") or []
    model_class = next((classes[name] for name in names if name in classes), None) or (
        BitForImageClassification if loader.head_size(checkpoint) else BitModel
    )
    return loader.build(model_class, checkpoint).float().eval()
