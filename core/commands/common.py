"""What every command shares: the --model/--json/--device/--device-map/--tf32 options, model loading, JSON
output; the ROME options several commands share (--preserve-weight/--preserve-facts/--value-precision)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from core.devices import DEVICE_MAP_NAMES, DeviceMap, parse_device_map
from core.errors import UserError
from core.models import EMBEDDED_MODEL, LoadedModel, load_model
from core.precision import allow_tf32
from core.rome import VALUE_PRECISIONS, RomeHyperParams


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="Hugging Face id or local folder (default: embedded)")
    parser.add_argument(
        "--json", dest="json_out", metavar="OUT", type=output_file, help="write the machine-readable result here"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--device-map",
        default=None,
        type=device_map,
        metavar="MAP",
        help=f"spread the model over GPUs, CPU and disk (accelerate): {', '.join(DEVICE_MAP_NAMES)}, "
        'or a JSON object / file {"module": "cuda:0" | "cpu" | "disk", ...}',
    )
    parser.add_argument(
        "--tf32", action="store_true", help="CUDA: TF32 matrix products (faster; tables differ slightly, bench/gpu.py)"
    )


def add_rome_options(parser: argparse.ArgumentParser) -> None:
    """For the commands that make ROME edits: the preserved subject keys (core/preserve.py) and the value
    optimisation's precision (core/block_copy.py)."""
    parser.add_argument(
        "--preserve-weight",
        type=non_negative_float,
        default=RomeHyperParams.preserve_weight,
        help="weight of the catalogue's subject keys in the update's covariance (0: plain ROME)",
    )
    parser.add_argument(
        "--preserve-facts",
        default="",
        metavar="FILE",
        help="the catalogue: a known-facts JSON file (default: data/known_facts.json)",
    )
    add_value_precision_option(parser)


def add_value_precision_option(parser: argparse.ArgumentParser) -> None:
    """--value-precision: the value optimisation's matrix products (core.rome.value_products)."""
    parser.add_argument(
        "--value-precision",
        choices=VALUE_PRECISIONS,
        default=RomeHyperParams.value_precision,
        help="the value optimisation's matrix products: auto (bfloat16 on a CPU that multiplies it natively, "
        "else the model's dtype), model (the model's dtype, as the paper), bfloat16",
    )


def rome_settings(args: argparse.Namespace, lm: LoadedModel) -> RomeHyperParams:
    """ROME's settings from --layer, --key-token, --corpus, --stats-tokens and the ROME options, checked."""
    hp = RomeHyperParams(
        layer=args.layer,
        key_token=args.key_token,
        stats_corpus=args.corpus,
        stats_tokens=args.stats_tokens,
        preserve_weight=args.preserve_weight,
        preserve_facts=args.preserve_facts,
        value_precision=args.value_precision,
    )
    hp.check(lm)
    return hp


def load(args: argparse.Namespace) -> LoadedModel:
    lm = load_model(args.model, device=args.device, device_map=getattr(args, "device_map", None))
    if getattr(args, "tf32", False):
        allow_tf32(lm)
    return lm


def output_file(text: str) -> str:
    """An argparse type for a file the command writes at the end: checked before any work is done, so a long
    run never ends in "cannot write". A missing folder is fine (it is created); an existing folder, or a
    place that cannot be written, is refused."""
    path = Path(text).expanduser()
    if not text.strip() or path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {str(existing)!r} is not writable")
    return text


def device_map(text: str) -> DeviceMap:
    """An argparse type for --device-map (core.devices.parse_device_map)."""
    try:
        return parse_device_map(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "tolist"):  # torch tensors
        return to_jsonable(value.tolist())
    return value


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(result), indent=2) + "\n", encoding="utf-8")
