"""`madoguchi scan-image`: real image files through the real decoder, as a process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from tests.support.camera import (
    EAN,
    FORM_ID,
    TICKET,
    VIAL_RAW,
    blur,
    centered,
    ean13,
    noise,
    place,
    qr,
    rotate,
    scene,
    vial,
)
from tests.support.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


def madoguchi(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=ROOT, timeout=60)


def test_scan_image_json_lists_every_code_with_its_interpretation(tmp_path: Path) -> None:
    ticket = tmp_path / "ticket.png"
    Image.fromarray(rotate(centered(qr(TICKET)), 25)).save(ticket)
    shelf = tmp_path / "shelf.jpg"  # lossy, and two codes in one picture
    Image.fromarray(noise(place(place(scene(), vial(), 40, 120), ean13(), 300, 260), 5)).save(
        shelf, quality=85
    )
    form = tmp_path / "form.png"
    Image.fromarray(blur(centered(qr(FORM_ID, 3)), 0.8)).save(form)

    out = madoguchi("scan-image", str(ticket), str(shelf), str(form), "--json")
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout)["files"]
    assert [f["file"] for f in files] == [str(ticket), str(shelf), str(form)]
    got = [sorted((c["text"], c["symbology"]) for c in f["codes"]) for f in files]
    assert got == [
        [(TICKET, "]Q1")],
        sorted([(VIAL_RAW, "]d2"), (EAN, "]E0")]),
        [(FORM_ID, "]Q1")],
    ]
    for f in files:
        for c in f["codes"]:
            assert set(c["interpretation"]) >= {"type", "valid", "problems"}


def test_scan_image_text_output_and_exit_codes(tmp_path: Path) -> None:
    ticket = tmp_path / "ticket.png"
    Image.fromarray(centered(qr(TICKET))).save(ticket)
    empty = tmp_path / "empty.png"
    Image.fromarray(scene()).save(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")

    out = madoguchi("scan-image", str(ticket))
    assert out.returncode == 0
    assert f"{ticket}: ]Q1 QR Code: '{TICKET}' ->" in out.stdout

    out = madoguchi("scan-image", str(ticket), str(empty))
    assert out.returncode == 1
    assert f"{empty}: no code found (640x480)" in out.stdout

    out = madoguchi("scan-image", str(broken), str(tmp_path / "missing.png"))
    assert out.returncode == 2
    assert f"{broken}: cannot read image" in out.stdout
    assert "missing.png: cannot read image: No such file or directory" in out.stdout

    out = madoguchi("scan-image", "--formats", "QRCode,Kanji", str(ticket))
    assert out.returncode == 2
    assert "--formats" in out.stderr
