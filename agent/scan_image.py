"""`madoguchi scan-image FILE... [--json]`: what the camera would read in these pictures.

A technician's tool (and the tests'): the same zxing-cpp decoder and the
same interpretation as the camera driver and the supervisor, on image files,
without a configuration, a camera or a broker. Exit status: 0 when every
file held at least one code, 1 when some file held none, 2 when a file could
not be read as an image.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.errors import DriverMissing
from agent.interpret import interpret

#: formats tried when --formats is not given: what stations read
DEFAULT_FORMATS = "QRCode,DataMatrix,EAN13,EAN8,Code128,ITF,Codabar,DataBar,DataBarExp,PDF417"


def add_scan_image_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "scan-image",
        help="decode barcodes / QR codes in image files and interpret them",
        description="Decode every code in each image (PNG, JPEG, ...) with zxing-cpp and "
        "print it with its interpretation, as the camera driver would store it.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help=f"comma-separated zxing-cpp formats (default: {DEFAULT_FORMATS})",
    )
    p.set_defaults(func=run_scan_image)


def scan_file(path: str, decoder: Any) -> dict[str, Any]:
    """Codes in one file: `{"file", "codes": [...]}` or `{"file", "error"}`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = img.convert("L")
            width, height = gray.size
    except (OSError, UnidentifiedImageError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return {"file": path, "error": f"cannot read image: {reason}"}
    codes = []
    for code in decoder.decode(gray):
        codes.append(
            {
                "text": code.text,
                "symbology": code.symbology,
                "format": code.format,
                "interpretation": interpret(code.text, symbology=code.symbology),
            }
        )
    return {"file": path, "width": width, "height": height, "codes": codes}


def run_scan_image(args: argparse.Namespace) -> int:
    from agent.drivers.camera import Decoder

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        decoder = Decoder(formats, try_rotate=True, try_invert=True, device="scan-image")
    except DriverMissing as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:  # zxing-cpp: unknown format name
        print(f"--formats: {e}", file=sys.stderr)
        return 2
    results = [scan_file(path, decoder) for path in args.files]
    if args.json:
        print(json.dumps({"files": results}, ensure_ascii=False, indent=1))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: {r['error']}")
                continue
            if not r["codes"]:
                print(f"{r['file']}: no code found ({r['width']}x{r['height']})")
            for c in r["codes"]:
                interp = c["interpretation"]
                verdict = "valid" if interp.get("valid") else "INVALID"
                problems = ",".join(interp.get("problems", []))
                shown = c["text"].replace("\x1d", "<GS>")
                print(
                    f"{r['file']}: {c['symbology']} {c['format']}: {shown!r} -> "
                    f"{interp.get('type')} {verdict}{' ' + problems if problems else ''}"
                )
    if any("error" in r for r in results):
        return 2
    return 0 if all(r["codes"] for r in results) else 1
