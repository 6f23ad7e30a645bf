"""The streamlic command line: export, compress, decompress, eval, prepare-data and sensitivity (see README.md).

The parser imports nothing heavy: each command checks its paths first, then loads torch and
the parts of the library it uses, so ``--help``, ``--version`` and path errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from . import __version__

FILE_SUFFIX = ".slic"
DECODED_SUFFIX = ".decoded.png"  # not .png: the source image usually still lies beside the file


def _run_export(args: argparse.Namespace) -> int:
    _check_paths([Path(args.checkpoint), *([Path(args.image)] if args.image else [])], [], args.force)
    _start_torch(args)
    from .images import load_image
    from .export import export_package
    from .model import StreamLIC

    model = StreamLIC.from_checkpoint(args.checkpoint)
    image = load_image(args.image) if args.image else None
    written = export_package(model, args.output, image=image, image_name=Path(args.image).name if args.image else None,
                             force=args.force)
    logging.getLogger("streamlic").info("wrote %d files to %s", len(written), args.output)
    return 0


def _check_paths(inputs: list[Path], outputs: list[Path | None], force: bool) -> None:
    """Path errors before torch is imported: a missing input, an output that cannot be written."""
    from .outputs import check_output

    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
    for path in outputs:
        if path is not None:
            check_output(path, force)


def _start_torch(args: argparse.Namespace) -> None:
    from .threads import apply_thread_policy

    apply_thread_policy(args.threads, log_level=logging.DEBUG)  # shown with --verbose


def _timed_file_command(args: argparse.Namespace, source: Path, output: Path, code) -> tuple[object, float]:
    """Check the paths, load the codec, run ``code(codec, output)``; returns its result and seconds."""
    _check_paths([source, args.checkpoint], [output], args.force)
    _start_torch(args)
    from .codec.io import load_codec

    codec = load_codec(args.checkpoint)
    start = time.perf_counter()
    result = code(codec, output)
    return result, time.perf_counter() - start


def _run_compress(args: argparse.Namespace) -> int:
    def encode(codec, output: Path):
        from .codec.io import encode_file

        return encode_file(codec, args.image, output, args.force)

    output = args.output or args.image.with_suffix(FILE_SUFFIX)
    encoded, seconds = _timed_file_command(args, args.image, output, encode)
    print(f"{output}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp "
          f"({encoded.width}x{encoded.height}, estimated {encoded.estimated_bpp:.4f} bpp), {seconds:.2f} s")
    return 0


def _run_decompress(args: argparse.Namespace) -> int:
    def decode(codec, output: Path):
        from .codec.io import decode_file

        return decode_file(codec, args.file, output, args.force)

    output = args.output or args.file.with_suffix(DECODED_SUFFIX)
    image, seconds = _timed_file_command(args, args.file, output, decode)
    print(f"{output}: {image.shape[2]}x{image.shape[1]} RGB PNG, {seconds:.2f} s")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    _check_paths([args.folder, *args.checkpoint, *args.compare], [args.output, args.plot], args.force)
    _start_torch(args)
    from .codec.evaluate import RESULT_METRICS, compare, evaluate_folder, finite_mean, load_results, plot_rd
    from .codec.io import write_atomically

    compared = [load_results(path) for path in args.compare]  # fail on a bad file before the long run
    results = evaluate_folder(args.checkpoint, args.folder, name=args.name)
    for point in results["per_image"]:
        print(f"\n{point['checkpoint']} (setup {point['setup_time']:.2f} s, not in the timings)")
        print(f"{'image':32s} {'size':>11s} {'bpp':>8s} {'est.bpp':>8s} {'PSNR':>7s} {'MS-SSIM':>8s} "
              f"{'enc s':>7s} {'dec s':>7s}")
        mean = {metric: finite_mean([record[metric] for record in point["images"]]) for metric in RESULT_METRICS}
        for record in point["images"] + [{**mean, "name": "mean"}]:
            size = f"{record['width']}x{record['height']}" if "width" in record else ""
            print(f"{record['name'][:32]:32s} {size:>11s} {record['bpp']:8.4f} "
                  f"{record['bpp-estimated']:8.4f} {_format(record['psnr-rgb'], 7, 2)} "
                  f"{_format(record['ms-ssim-rgb'], 8, 4)} {record['encoding_time']:7.2f} "
                  f"{record['decoding_time']:7.2f}")
    if compared:
        print()
        print("\n".join(compare(results, compared)))
    if args.output is not None:
        text = json.dumps(results, indent=2)
        write_atomically(args.output, lambda f: f.write(text.encode()), args.force)
        print(f"wrote {args.output}")
    if args.plot is not None:
        plot_rd([results, *compared], args.plot, args.force)
        print(f"wrote {args.plot}")
    return 0


def _run_prepare_data(args: argparse.Namespace) -> int:
    _check_paths([args.src], [], force=False)  # DST: the store itself decides (an unfinished store is resumed)
    _start_torch(args)
    from .patches import prepare_store

    try:
        index = prepare_store(args.src, args.dst, crop_size=args.crop_size, stride=args.stride,
                              crops_per_image=args.crops_per_image, seed=args.seed, workers=args.workers,
                              images_per_shard=args.images_per_shard, force=args.force)
    except KeyboardInterrupt:
        logging.getLogger("streamlic").error("interrupted; rerun the same command to finish (%s keeps the finished "
                                             "shards)", args.dst)
        return 1
    print(f"{args.dst}: {index['crops']} crops of {index['crop_size'][0]}x{index['crop_size'][1]} in "
          f"{len(index['shards'])} shards, {len(index['skipped'])} files skipped, checksum {index['checksum']}")
    return 0


def _run_sensitivity(args: argparse.Namespace) -> int:
    from .sensitivity_report import HARDWARE_GROUP, RESULT_FILES

    # the outputs are checked before the study, not after it: a new folder's parent, an existing one's files
    if args.out.exists() and not args.out.is_dir():  # --force replaces files in the folder, not the folder
        raise NotADirectoryError(f"{args.out}: not a folder (-o names the folder of the study's outputs)")
    outputs = ([*(args.out / name for name in RESULT_FILES), *(args.out / HARDWARE_GROUP).glob("*.yaml")]
               if args.out.is_dir() else [args.out])
    _check_paths([args.checkpoint, *([args.data] if args.data else [])], outputs, args.force)
    _start_torch(args)
    from .sensitivity import run_study
    from .sensitivity_report import markdown, write_results

    results = run_study(args.checkpoint, args.data, args.widths, args.tolerances, args.crop)
    args.out.mkdir(exist_ok=True)
    written = write_results(results, args.out, args.force)
    print(markdown(results))
    print(f"wrote {', '.join(map(str, written))} ({results['seconds']:.0f} s)")
    return 0


def _size(text: str) -> int | list[int]:
    """``256`` or ``256x192`` (height x width)."""
    parts = [int(part) for part in text.lower().split("x")]
    return parts[0] if len(parts) == 1 else parts


def _format(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{decimals}f}"


def _thread_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive count, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlic", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="CPU threads (default: 1 per process, or OMP_NUM_THREADS when set; 0: torch's default)")
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser(
        "export", help="write the integer parameters, HLS streams, C header, tables and hardware report",
        description="Export a QAT-or-later StreamLIC checkpoint (Lightning or plain state dict) for hardware.")
    export.add_argument("checkpoint", help="stage checkpoint (.ckpt) or state dict file")
    export.add_argument("-o", "--output", required=True, help="output directory")
    export.add_argument("--image", help="image file whose integer tensors become golden test vectors")
    export.add_argument("--force", action="store_true",
                        help="replace the export in a non-empty output directory (files it lists are removed)")
    export.set_defaults(func=_run_export)

    compress = sub.add_parser("compress", help="compress an image into a StreamLIC file")
    compress.add_argument("image", type=Path, help="image file (PNG, JPEG, ...; any size and mode)")
    compress.add_argument("-c", "--checkpoint", required=True, type=Path,
                          help="stage-3-or-later checkpoint (or export directory)")
    compress.add_argument("-o", "--output", type=Path, help=f"output file (default: IMAGE with suffix {FILE_SUFFIX})")
    compress.add_argument("--force", action="store_true", help="overwrite an existing output")
    compress.set_defaults(func=_run_compress)

    decompress = sub.add_parser("decompress", help="decode a StreamLIC file into an 8-bit RGB PNG")
    decompress.add_argument("file", type=Path, help="StreamLIC file")
    decompress.add_argument("-c", "--checkpoint", required=True, type=Path,
                            help="the checkpoint (or export directory) that made the file")
    decompress.add_argument("-o", "--output", type=Path,
                            help=f"output PNG (default: FILE with suffix {DECODED_SUFFIX}, beside the source image)")
    decompress.add_argument("--force", action="store_true", help="overwrite an existing output")
    decompress.set_defaults(func=_run_decompress)

    evaluate = sub.add_parser("eval", help="rate-distortion of checkpoints on an image folder")
    evaluate.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    evaluate.add_argument("-c", "--checkpoint", required=True, type=Path, nargs="+",
                          help="one or more checkpoints; each is one point of the RD curve")
    evaluate.add_argument("-o", "--output", type=Path, help="results JSON (CompressAI's format)")
    evaluate.add_argument("--plot", type=Path, help="RD plot PNG")
    evaluate.add_argument("--compare", type=Path, nargs="+", default=[],
                          help="CompressAI-format results JSON files to overlay on the plot; the BD-rate of this "
                               "curve against each is printed and stored in the output JSON")
    evaluate.add_argument("--name", default="StreamLIC", help="name of this curve in the JSON and the plot")
    evaluate.add_argument("--force", action="store_true", help="overwrite existing outputs")
    evaluate.set_defaults(func=_run_eval)

    prepare = sub.add_parser(
        "prepare-data", help="cut a folder of images into a patch store that data=patches trains from",
        description="Decode every image under SRC once and write its crops as uint8 shards with an index into DST. "
                    "Deterministic; rerun the same command to finish an interrupted store.")
    prepare.add_argument("src", type=Path, help="folder of images (searched recursively; png, jpg, webp, bmp, tif)")
    prepare.add_argument("dst", type=Path, help="output folder of the store (empty, or an unfinished store)")
    prepare.add_argument("--crop-size", type=_size, default=256, help="crop size, N or HxW (default 256)")
    how = prepare.add_mutually_exclusive_group()
    how.add_argument("--stride", type=_size, help="crops on a grid with this step, N or HxW (default: the crop size)")
    how.add_argument("--crops-per-image", type=int, help="this many crops per image at seeded random places")
    prepare.add_argument("--seed", type=int, default=0, help="seed of --crops-per-image (default 0)")
    prepare.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    prepare.add_argument("--images-per-shard", type=int, default=16,
                         help="source images per shard, the unit a rerun resumes at (default 16)")
    prepare.add_argument("--force", action="store_true", help="replace the store in a non-empty DST")
    prepare.set_defaults(func=_run_prepare_data)

    sensitivity = sub.add_parser(
        "sensitivity", help="RD-loss change per layer and bit width, and the per-layer widths it suggests",
        description="Measure how much the validation RD loss of a stage-2-or-later checkpoint changes when only "
                    "one layer's weights or activations are quantized at each width; allocate widths per "
                    "tolerance; measure each allocation and the uniform w12a12 and w8a8 configs at QAT entry.")
    sensitivity.add_argument("checkpoint", type=Path, help="stage-2-or-later stage checkpoint (stageN-*.ckpt)")
    sensitivity.add_argument("--data", type=Path,
                             help="folder of validation images (default: the checkpoint's run's validation set)")
    sensitivity.add_argument("--crop", type=_size,
                             help="validation centre crop, 256 or 256x384 (default: the run's data.val_patch_size); "
                                  "more pixels, less noise in the changes")
    sensitivity.add_argument("--widths", type=int, nargs="+",
                             help="candidate bit widths of weights and activations (default: 8 10 12)")
    sensitivity.add_argument("--tolerances", type=float, nargs="+",
                             help="allowed RD-loss change per layer, in percent: one allocation each (default 0.5 1 2)")
    sensitivity.add_argument("-o", "--out", type=Path, default=Path("sensitivity"),
                             help="output folder for sensitivity.json, .md and .png (default ./sensitivity)")
    sensitivity.add_argument("--force", action="store_true", help="overwrite existing outputs")
    sensitivity.set_defaults(func=_run_sensitivity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:  # dependency deprecation notices say nothing a user of the command can act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as err:
        if args.verbose:
            raise
        logging.getLogger("streamlic").error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
