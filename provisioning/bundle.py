#!/usr/bin/env python3
"""Build the offline bundle: `make bundle` -> dist/madoguchi-bundle-VERSION.tar.gz.

One tarball a technician carries to a station with no internet (the My Number business
network): the madoguchi wheel, every dependency wheel of the extras a station can use,
per platform (CPython 3.11, glibc 2.36: Raspberry Pi OS / Debian 12 bookworm), the
installer with the unit, rules and docs, the Debian packages a station needs, and
manifest.json (version, platform dirs, what PyPI has no wheel for, sha256 of every file).

    python3 provisioning/bundle.py [--platforms aarch64,armv7l,x86_64] [--out dist]
        [--debian-packages "pcscd ..."] [--wheel madoguchi-X-py3-none-any.whl]

A dependency PyPI has no wheel for (evdev and pyscard: sdist only) is not a failure:
its sdist goes into sdist/ with its build requirements as wheels for each platform;
for the platform this script runs on (when it is CPython 3.11) it is also built into a
wheel here. The manifest names, per platform, what is left to build on the station
(install.sh does it: pip builds from sdist/, offline, with gcc and the -dev packages).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
#: The extras a station can use (not central, bench, dev).
STATION_EXTRAS = ("serial", "hid", "card", "interpret", "camera", "kiosk")
PLATFORMS = ("aarch64", "armv7l", "x86_64")
PYTHON = "3.11"
ABI = "cp311"
GLIBC_MINOR = 36  # bookworm's glibc 2.36
#: What goes into the bundle besides wheels, so that the installer runs from it.
SOURCE_DIRS = ("provisioning", "systemd", "docs", "device_profiles")
MISSING_RE = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


def log(msg: str) -> None:
    print(f"bundle: {msg}", file=sys.stderr, flush=True)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)", req)
    assert m, req
    return normalize(m.group(1))


def platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a glibc-2.36 system of this arch accepts (pip does not expand them).

    musllinux wheels do not apply: Raspberry Pi OS and Debian are glibc systems.
    """
    lowest = 5 if arch == "x86_64" else 17
    tags = [f"manylinux_2_{m}_{arch}" for m in range(GLIBC_MINOR, lowest - 1, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def host_platform() -> str | None:
    """The bundle platform wheels built here are for, if any (CPython 3.11, 64/32-bit)."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return None
    if sys.platform != "linux":
        return None
    machine = platform.machine()
    if machine == "aarch64" and sys.maxsize < 2**32:
        machine = "armv7l"  # 32-bit userland on a 64-bit kernel
    return machine if machine in PLATFORMS else None


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        sys.exit(f"bundle: pip {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return r


def build_wheel(dest: Path) -> Path:
    log(f"building the madoguchi wheel from {SRC}")
    pip("wheel", "--no-deps", "-q", "-w", str(dest), str(SRC))
    wheels = sorted(dest.glob("madoguchi-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"bundle: expected one madoguchi wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def wheel_metadata(wheel: Path) -> tuple[str, list[str], dict[str, list[str]]]:
    """(version, base requirements, extra -> requirements) from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    version = re.search(r"^Version: (.+)$", text, re.M)
    assert version
    base: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req, _, marker = line.partition(";")
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if m:
            extras.setdefault(m.group(1), []).append(req.strip())
        else:
            base.append(req.strip())
    return version.group(1).strip(), base, extras


def _download(reqs: list[str], dest: Path, arch: str) -> subprocess.CompletedProcess[str]:
    plat_args = [a for tag in platform_tags(arch) for a in ("--platform", tag)]
    return pip(
        "download", "-q", "--dest", str(dest), "--only-binary=:all:", *plat_args,
        "--python-version", PYTHON, "--implementation", "cp", "--abi", ABI, *reqs,
        check=False,
    )  # fmt: skip


def _last_error(stderr: str) -> str:
    errors = [ln.removeprefix("ERROR: ") for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    return errors[-1] if errors else stderr.strip().splitlines()[-1]


def _why(req: str, dest: Path, arch: str, stderr: str) -> str:
    """Name the dependency that has no wheel when the package itself has one."""
    with tempfile.TemporaryDirectory() as tmp:
        if _download(["--no-deps", req], Path(tmp), arch).returncode != 0:
            return _last_error(stderr)
        _, deps, _ = wheel_metadata(next(Path(tmp).glob("*.whl")))
        for dep in deps:
            if _download(["--no-deps", dep], Path(tmp), arch).returncode != 0:
                return f"its dependency {dep} has no {arch} wheel on PyPI"
    return _last_error(stderr)


def download_binary(reqs: list[str], dest: Path, arch: str) -> dict[str, tuple[str, str]]:
    """Wheels of reqs and their dependencies into dest.

    Returns name -> (requirement, why) for the requirements PyPI cannot serve as wheels
    for arch (none for the package itself, or none for one of its dependencies).
    """
    missing: dict[str, tuple[str, str]] = {}
    while True:
        todo = [r for r in reqs if req_name(r) not in missing]
        r = _download(todo, dest, arch)
        if r.returncode == 0:
            return missing
        m = MISSING_RE.search(r.stderr)
        top = [q for q in todo if m and req_name(q) == normalize(m.group(1))]
        if not top:
            break  # a dependency's dependency, or a conflict: find out one by one
        log(f"{arch}: no wheel on PyPI for {top[0]}")
        missing[req_name(top[0])] = (top[0], f"no {arch} wheel on PyPI")
    for req in todo:
        r = _download([req], dest, arch)
        if r.returncode != 0:
            why = _why(req, dest, arch, r.stderr)
            log(f"{arch}: {req}: {why}")
            missing[req_name(req)] = (req, why)
    return missing


def sdist_build_requires(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as t:
        member = next((m for m in t.getmembers() if m.name.count("/") == 1
                       and m.name.endswith("/pyproject.toml")), None)  # fmt: skip
        if member is None:
            return ["setuptools", "wheel"]
        f = t.extractfile(member)
        assert f is not None
        data = tomllib.load(io.BytesIO(f.read()))
    requires = data.get("build-system", {}).get("requires", ["setuptools", "wheel"])
    return [str(r) for r in requires]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated")
    ap.add_argument("--out", type=Path, default=SRC / "dist", help="directory for the tarball")
    ap.add_argument("--debian-packages", default="", help="space-separated, from the Makefile")
    ap.add_argument("--wheel", type=Path, help="use this madoguchi wheel instead of building one")
    args = ap.parse_args(argv)
    platforms = [p for p in args.platforms.replace(" ", ",").split(",") if p]
    for p in platforms:
        if p not in PLATFORMS:
            ap.error(f"--platforms: unknown platform {p!r} (one of {', '.join(PLATFORMS)})")

    with tempfile.TemporaryDirectory(prefix="madoguchi-bundle-") as tmp:
        work = Path(tmp)
        wheel = args.wheel or build_wheel(work / "project")
        version, base, extras = wheel_metadata(wheel)
        top = f"madoguchi-bundle-{version}"
        stage = work / top
        reqs = list(dict.fromkeys(base + [r for e in STATION_EXTRAS for r in extras.get(e, [])]))
        req_extra = {req_name(r): e for e in STATION_EXTRAS for r in extras.get(e, [])}

        missing: dict[str, dict[str, tuple[str, str]]] = {}
        for arch in platforms:
            dest = stage / "wheels" / arch
            dest.mkdir(parents=True)
            log(f"{arch}: downloading wheels for {len(reqs)} requirements")
            missing[arch] = download_binary(reqs, dest, arch)
            shutil.copy2(wheel, dest / wheel.name)

        # A package without wheels for the main targets (aarch64, x86_64) is built on
        # the station from its sdist, in the bundle. armv7l-only gaps are just named.
        host = host_platform()
        status: dict[str, dict[str, str]] = {arch: {} for arch in platforms}
        sdists: dict[str, dict[str, object]] = {}
        main = [a for a in platforms if a != "armv7l"] or platforms
        need = {n: rw[0] for a in main for n, rw in missing[a].items()}
        for name, req in sorted(need.items()):
            sd = stage / "sdist"
            sd.mkdir(exist_ok=True)
            before = set(sd.iterdir())
            pip("download", "-q", "--no-deps", f"--no-binary={name}", "--dest", str(sd), req)
            new = sorted(set(sd.iterdir()) - before)
            if len(new) != 1:
                sys.exit(f"bundle: expected one sdist for {req}, got {[p.name for p in new]}")
            build_reqs = sdist_build_requires(new[0])
            sdists[name] = {
                "requirement": req,
                "extra": req_extra.get(name, ""),
                "sdist": f"sdist/{new[0].name}",
                "build_requires": build_reqs,
            }
            for arch in platforms:
                if name not in missing[arch]:
                    continue
                # pip builds an sdist in an isolated environment: its build
                # requirements must be there as wheels too (also to rebuild it later).
                lost = download_binary(build_reqs, stage / "wheels" / arch, arch)
                if arch == host:
                    log(f"{arch}: building {new[0].name} into a wheel on this host")
                    pip("wheel", "--no-deps", "-q", "-w", str(stage / "wheels" / arch), str(new[0]))
                    status[arch][name] = f"built here from {sdists[name]['sdist']}"
                    continue
                status[arch][name] = f"built on the station from {sdists[name]['sdist']}" + (
                    f" (build requirements without wheels: {', '.join(sorted(lost))})"
                    if lost
                    else ""
                )
        for arch in platforms:
            for name, (req, why) in missing[arch].items():
                status[arch].setdefault(name, f"not in the bundle: {req}: {why}")

        for d in SOURCE_DIRS:
            shutil.copytree(SRC / d, stage / d, ignore=shutil.ignore_patterns("__pycache__"))
        packages = sorted(set(args.debian_packages.split()))
        (stage / "debian-packages.txt").write_text("".join(p + "\n" for p in packages))

        files = {
            str(p.relative_to(stage)): sha256(p) for p in sorted(stage.rglob("*")) if p.is_file()
        }
        manifest = {
            "name": "madoguchi",
            "version": version,
            "python": {"version": PYTHON, "implementation": "cp", "abi": ABI},
            "extras": list(STATION_EXTRAS),
            "project_wheel": wheel.name,
            "platforms": {
                arch: {
                    "dir": f"wheels/{arch}",
                    "tags": platform_tags(arch),
                    "no_wheel_on_pypi": dict(sorted(status[arch].items())),
                }
                for arch in platforms
            },
            "sdists": sdists,
            "debian_packages": packages,
            "files": files,
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"{top}.tar.gz"
        tmp_out = out.with_suffix(".tmp")
        with tarfile.open(tmp_out, "w:gz") as t:
            t.add(stage, arcname=top)
        tmp_out.replace(out)
    size = out.stat().st_size
    print(f"{out}: {size / 1e6:.1f} MB, platforms {', '.join(platforms)}")
    for arch in platforms:
        for name, what in status[arch].items():
            print(f"  {arch}: {name}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
