#!/bin/bash
# Provision a madoguchi station: Raspberry Pi OS Bookworm or Debian 12.
#
#   sudo provisioning/install.sh --config station.toml [--ca fleet-ca.crt] [--kiosk]
#   sudo provisioning/install.sh --offline madoguchi-bundle-X.tar.gz --config station.toml
#   provisioning/install.sh --dry-run --config station.toml   # list the changes, make none
#   provisioning/install.sh --root /tmp/pi-root --config station.toml   # into a directory
#
#   --config FILE     the station's agent.toml (station-local profiles in device_profiles/
#                     beside it); without it an installed /etc/madoguchi/agent.toml is kept
#   --ca FILE         the fleet CA certificate (verifies the broker)
#   --offline BUNDLE  install from `make bundle`'s tarball (or its unpacked directory),
#                     with no network at all: pip --no-index from the bundle's wheels
#   --kiosk           also provision the kiosk: user and group madoguchi-kiosk, the API
#                     token it may read, the Chromium launcher (docs/kiosk.md)
#   --kiosk-user NAME the desktop user that runs the kiosk (default madoguchi-kiosk)
#   --dry-run         print every change it would make, and make none
#   --root DIR        install below DIR; host commands (apt-get, useradd, systemctl,
#                     udevadm, chgrp) are printed as "would run: ..." instead
#
# It first runs `madoguchi check-config` (the madoguchi being installed) and stops,
# changing nothing, if the config has problems. It installs the madoguchi wheel (from
# the bundle, or built from this source tree) with the extras the configured devices
# need. Idempotent: a second run changes nothing and says so. It never replaces a key.
set -euo pipefail

USER_NAME=madoguchi
KIOSK_GROUP=madoguchi-kiosk
KIOSK_USER=madoguchi-kiosk
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
CONFIG=""
CA=""
BUNDLE=""
KIOSK=0
DRY=0
VENV=/opt/madoguchi/venv
RELEASES=/opt/madoguchi/releases
STATE=/var/lib/madoguchi
CONFIG_FILE=$STATE/config/agent.toml
CONFIG_LINK=/etc/madoguchi/agent.toml
CONFIG_LINK_TARGET=../..$CONFIG_FILE  # relative: right under --root too
DOCS=/usr/share/doc/madoguchi
KIOSK_TOKEN=/etc/madoguchi/kiosk/api-token

usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}
die() { echo "install.sh: $*" >&2; exit 1; }

[ $# -gt 0 ] || usage 2
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --ca) CA=${2:?--ca needs a file}; shift 2 ;;
        --offline) BUNDLE=${2:?--offline needs the bundle}; shift 2 ;;
        --kiosk) KIOSK=1; shift ;;
        --kiosk-user) KIOSK_USER=${2:?--kiosk-user needs a name}; KIOSK=1; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --source) SRC=${2:?--source needs a directory}; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
done

if [ -n "$ROOT" ]; then
    ROOT=$(realpath -m "$ROOT")  # made only once the config has passed its check
    if [ "$ROOT" = / ]; then
        echo "install.sh: --root / is the host; run without --root instead" >&2
        exit 2
    fi
elif [ "$(id -u)" != 0 ] && [ "$DRY" = 0 ]; then
    die "run as root (or use --dry-run, or --root DIR to install into a directory)"
fi
for f in "$CONFIG" "$CA"; do
    if [ -n "$f" ] && [ ! -r "$f" ]; then
        die "cannot read $f"
    fi
done
if [ -n "$BUNDLE" ] && [ ! -r "$BUNDLE" ]; then
    die "--offline $BUNDLE: cannot read it"
fi

log() { printf '==> %s\n' "$*"; }
CHANGES=0
# change WHAT: one change, made now (or, with --dry-run, only listed).
change() {
    CHANGES=$((CHANGES + 1))
    if [ "$DRY" = 1 ]; then
        echo "    would $*"
    else
        echo "    $*"
    fi
}

# Commands that change the host: run them, or with --root/--dry-run only say so.
host() {
    if [ -n "$ROOT" ] || [ "$DRY" = 1 ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# Checks of host state: with --root the host is not the target, so "missing".
on_host() { [ -z "$ROOT" ] && "$@"; }

# same MODE SRC DEST: DEST (under the root) already has this content and mode.
same() {
    [ -f "$3" ] && [ ! -L "$3" ] && cmp -s "$2" "$3" && [ "$(stat -c %a "$3")" = "${1#0}" ]
}

# put MODE SOURCE DEST [GROUP]: install a file under the root, atomically, root-owned.
put() {
    local mode=$1 src=$2 dest=$ROOT$3 group=${4:-} tmp
    if same "$mode" "$src" "$dest"; then
        group_of "$3" "$group"
        return 0
    fi
    change "install $3 (mode $mode${group:+, group $group})"
    [ "$DRY" = 1 ] && return 0
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.install.XXXXXX")
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    if [ -n "$group" ]; then host chgrp "$group" "$3"; fi
}

# text MODE DEST [GROUP] < CONTENT
text() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    put "$1" "$tmp" "$2" "${3:-}"
    rm -f "$tmp"
}

# group_of PATH GROUP: on the host, fix a wrong group (under --root it is never applied).
group_of() {
    if [ -n "$2" ] && [ -z "$ROOT" ] && [ -e "$1" ] && [ "$(stat -c %G "$1")" != "$2" ]; then
        change "chgrp $2 $1"
        host chgrp "$2" "$1"
    fi
}

# dir MODE PATH [GROUP]
dir() {
    local d=$ROOT$2
    if [ ! -d "$d" ]; then
        change "create $2/ (mode $1${3:+, group $3})"
        [ "$DRY" = 1 ] || { mkdir -p "$d" && chmod "$1" "$d"; }
        if [ -n "${3:-}" ]; then host chgrp "$3" "$2"; fi
    elif [ "$(stat -c %a "$d")" != "${1#0}" ]; then
        change "chmod $1 $2/"
        [ "$DRY" = 1 ] || chmod "$1" "$d"
        group_of "$2" "${3:-}"
    else
        group_of "$2" "${3:-}"
    fi
}

# owner_of PATH: the service user owns PATH (state it writes). Under --root: said, not done.
owner_of() {
    if [ -n "$ROOT" ] || [ "$DRY" = 1 ]; then
        host chown "$USER_NAME:$USER_NAME" "$1"
    elif [ -e "$1" ] && [ "$(stat -c %U:%G "$1")" != "$USER_NAME:$USER_NAME" ]; then
        change "chown $USER_NAME:$USER_NAME $1"
        chown "$USER_NAME:$USER_NAME" "$1"
    fi
}

# chmod_if MODE PATH: tighten/loosen an existing file to MODE.
chmod_if() {
    if [ -e "$ROOT$2" ] && [ "$(stat -c %a "$ROOT$2")" != "${1#0}" ]; then
        change "chmod $1 $2"
        [ "$DRY" = 1 ] || chmod "$1" "$ROOT$2"
    fi
}

# secret MODE PATH GROUP BYTES what: a random secret, made once, never replaced.
secret() {
    local f=$ROOT$2
    if [ -s "$f" ]; then
        chmod_if "$1" "$2"
        group_of "$2" "$3"
        return 0
    fi
    change "make $2: $5 (mode $1)"
    [ "$DRY" = 1 ] && return 0
    if [ "$4" = token ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$f.tmp" \
            && echo >>"$f.tmp")
    else
        (umask 077 && head -c "$4" /dev/urandom >"$f.tmp")
    fi
    chmod "$1" "$f.tmp"
    mv -f "$f.tmp" "$f"
    if [ -n "$3" ]; then host chgrp "$3" "$2"; fi
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/madoguchi-install.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# --- the bundle, the wheel, the config check: before any change ------------------------
arch() {
    case "$(dpkg --print-architecture 2>/dev/null || uname -m)" in
        amd64|x86_64) echo x86_64 ;;
        arm64|aarch64) echo aarch64 ;;
        armhf|armv7l) echo armv7l ;;
        *) die "unsupported architecture $(uname -m)" ;;
    esac
}

WHEELS=""       # pip --find-links for this machine (offline)
PIP_SOURCES=()  # how pip finds the dependencies
prepare() {
    if [ -n "$BUNDLE" ]; then
        local b=$BUNDLE a
        if [ -f "$b" ]; then
            log "unpacking $BUNDLE"
            tar -xzf "$b" -C "$TMP" || die "$BUNDLE: not a readable bundle tarball"
            b=$(find "$TMP" -mindepth 1 -maxdepth 1 -type d -name 'madoguchi-bundle-*' | head -n1)
            [ -n "$b" ] || die "$BUNDLE: no madoguchi-bundle-* directory in it"
        fi
        b=$(cd "$b" && pwd)
        [ -f "$b/manifest.json" ] || die "$BUNDLE: no manifest.json (not a madoguchi bundle)"
        python3 - "$b" <<'PY' || die "$BUNDLE: damaged (see above); make it again"
import hashlib, json, sys
from pathlib import Path
root = Path(sys.argv[1])
bad = []
for rel, digest in json.loads((root / "manifest.json").read_text())["files"].items():
    p = root / rel
    if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
        bad.append(rel)
for rel in bad:
    print(f"install.sh: bundle file {rel}: missing or changed", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
        a=$(arch)
        WHEELS=$b/wheels/$a
        [ -d "$WHEELS" ] || die "$BUNDLE: no wheels for this machine ($a); make bundle BUNDLE_PLATFORMS=$a"
        PIP_SOURCES=(--no-index --find-links "$WHEELS")
        [ -d "$b/sdist" ] && PIP_SOURCES+=(--find-links "$b/sdist")
        SRC=$b
        WHEEL=$(find "$WHEELS" -maxdepth 1 -name 'madoguchi-*.whl' | head -n1)
        [ -n "$WHEEL" ] || die "$BUNDLE: no madoguchi wheel in wheels/$a"
    fi
    log "checking the configuration with the madoguchi being installed"
    if [ -z "$BUNDLE" ]; then
        python3 -m venv "$TMP/venv" || die "python3 -m venv failed (apt-get install python3-venv)"
        "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=77.0.3" \
            >/dev/null 2>&1 || true
        "$TMP/venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
            -w "$TMP/wheel" "$SRC" >"$TMP/wheel.log" 2>&1 \
            || { cat "$TMP/wheel.log" >&2; die "could not build the madoguchi wheel from $SRC"; }
        WHEEL=$(find "$TMP/wheel" -name 'madoguchi-*.whl' | head -n1)
    fi
    FINGERPRINT=$(python3 - "$WHEEL" <<'PY'
import hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    lines = sorted(l for l in z.read(record).decode().splitlines() if l and not l.startswith(record))
print(hashlib.sha256("\n".join(lines).encode()).hexdigest())
PY
)
}

check_config() {
    local cfg=$1 mado out rc=0 problems=0
    if [ -x "$ROOT$VENV/bin/madoguchi" ] && grep -qs "^wheel=$FINGERPRINT$" "$ROOT$VENV/madoguchi-install"; then
        mado=$ROOT$VENV/bin/madoguchi   # this very wheel is installed already
    else
        [ -x "$TMP/venv/bin/python" ] || python3 -m venv "$TMP/venv" \
            || die "python3 -m venv failed (apt-get install python3-venv)"
        "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check \
            "${PIP_SOURCES[@]}" "$WHEEL" >"$TMP/pip.log" 2>&1 \
            || { cat "$TMP/pip.log" >&2; die "could not install $WHEEL to check the config"; }
        mado=$TMP/venv/bin/madoguchi
    fi
    out=$("$mado" check-config --config-only "$cfg" 2>&1) || rc=$?
    if [ "$rc" != 0 ]; then
        printf '%s\n' "$out" >&2
        problems=1
    fi
    local kiosk_flag=()
    [ "$KIOSK" = 1 ] && kiosk_flag=(--kiosk)
    if ! python3 "$SRC/provisioning/station_extras.py" --config "$cfg" "${kiosk_flag[@]}" \
        --profile-dir "$ROOT/etc/madoguchi/device_profiles" \
        --profile-dir "$SRC/device_profiles" >"$TMP/extras" 2>"$TMP/extras.err"; then
        cat "$TMP/extras.err" >&2
        problems=1
    fi
    if [ "$problems" = 1 ]; then
        die "$cfg has the problems above; nothing was changed"
    fi
    printf '%s\n' "$out" | sed 's/^/    /'
    EXTRAS=$(sed -n 's/^extras=//p' "$TMP/extras")
    API_PORT=$(sed -n 's/^api_port=//p' "$TMP/extras")
    echo "    extras for these devices: ${EXTRAS:-none}"
}

# --- packages -------------------------------------------------------------------
packages() {
    local pkgs=(pcscd libccid mosquitto-clients python3 python3-venv) p
    # No wheels on PyPI for evdev (hid) and pyscard (card): pip builds them here.
    local need_build=0
    case ",$EXTRAS," in *,hid,*) ls "${WHEELS:-/nonexistent}"/evdev-*.whl >/dev/null 2>&1 || need_build=1 ;; esac
    case ",$EXTRAS," in *,card,*) ls "${WHEELS:-/nonexistent}"/pyscard-*.whl >/dev/null 2>&1 || need_build=1 ;; esac
    [ "$need_build" = 1 ] && pkgs+=(python3-dev gcc linux-libc-dev swig libpcsclite-dev)
    [ "$KIOSK" = 1 ] && pkgs+=(chromium fonts-ipafont-gothic)
    if on_host apt-cache show python3-picamera2 >/dev/null 2>&1; then
        pkgs+=(python3-picamera2)  # Raspberry Pi OS only: camera stations
    fi
    log "system packages"
    if [ -n "$ROOT" ]; then
        host env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
        echo "would run: apt-get install python3-picamera2 (where the archive has it)"
        return 0
    fi
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    change "apt-get install ${missing[*]}"
    [ "$DRY" = 1 ] && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get could not install ${missing[*]} (offline? see docs/provisioning.md, 'Debian packages')"
}

# --- users and groups ----------------------------------------------------------------
group() {
    if ! on_host getent group "$1" >/dev/null; then
        [ -z "$ROOT" ] && change "add group $1"
        host groupadd --system -f "$1"
    fi
}

service_user() {
    log "user $USER_NAME (system, no login) and device groups"
    local g
    for g in input dialout video; do group "$g"; done
    if ! on_host getent passwd "$USER_NAME" >/dev/null; then
        [ -z "$ROOT" ] && change "add system user $USER_NAME"
        host useradd --system --user-group --home-dir /var/lib/madoguchi --no-create-home \
            --shell /usr/sbin/nologin --comment "madoguchi station agent" "$USER_NAME"
    fi
}

# --- the program -------------------------------------------------------------------
program() {
    log "madoguchi $(basename "$WHEEL") [${EXTRAS}] in $VENV"
    local stamp
    stamp=$(printf 'wheel=%s\nextras=%s\n' "$FINGERPRINT" "$EXTRAS")
    if [ -x "$ROOT$VENV/bin/python" ] && [ "$(cat "$ROOT$VENV/madoguchi-install" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    dir 0755 /opt/madoguchi
    local spec=$WHEEL
    [ -n "$EXTRAS" ] && spec="${WHEEL}[$EXTRAS]"
    if [ ! -x "$ROOT$VENV/bin/python" ]; then
        # --system-site-packages: picamera2 and libcamera come from apt, not PyPI.
        change "create the venv $VENV"
        [ "$DRY" = 1 ] || python3 -m venv --system-site-packages "$ROOT$VENV"
    fi
    change "pip install ${PIP_SOURCES[*]} $(basename "$spec") into $VENV"
    [ "$DRY" = 1 ] && return 0
    # The wheel, never an editable checkout; force it in, since a rebuilt wheel may
    # keep the version number. pip byte-compiles (the service sees /opt read-only).
    "$ROOT$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_SOURCES[@]}" "$spec" \
        || die "pip could not install $spec"
    "$ROOT$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall \
        "${PIP_SOURCES[@]}" "$WHEEL" || die "pip could not install $WHEEL"
    printf '%s\n' "$stamp" >"$ROOT$VENV/madoguchi-install"
}

state_dirs() {
    dir 0700 "$STATE"
    owner_of "$STATE"
    dir 0700 "$STATE/config"
    owner_of "$STATE/config"
}

# The A/B releases directory (docs/fleet.md): the base venv is the first release,
# `current` points at it until a fleet update switches to a release installed beside.
releases() {
    local version
    version=$(basename "$WHEEL" | cut -d- -f2)
    log "releases in $RELEASES: $version is the base venv"
    dir 0755 "$RELEASES"
    owner_of "$RELEASES"
    if [ "$(readlink "$ROOT$RELEASES/$version" 2>/dev/null)" != ../venv ]; then
        if [ -e "$ROOT$RELEASES/$version" ] && [ ! -L "$ROOT$RELEASES/$version" ]; then
            echo "    $RELEASES/$version is a release a fleet update installed: kept"
        else
            change "link $RELEASES/$version -> ../venv"
            [ "$DRY" = 1 ] || ln -sfn ../venv "$ROOT$RELEASES/$version"
        fi
    fi
    # current follows the base install unless a fleet update moved it to its own release
    local cur
    cur=$(readlink "$ROOT$RELEASES/current" 2>/dev/null || true)
    if [ -z "$cur" ] || { [ "$cur" != "$version" ] && [ "$(readlink "$ROOT$RELEASES/$cur" 2>/dev/null)" = ../venv ]; }; then
        if [ "$cur" != "$version" ] && { [ "$DRY" = 1 ] || [ -e "$ROOT$RELEASES/$version" ]; }; then
            change "point $RELEASES/current at $version"
            [ "$DRY" = 1 ] || ln -sfn "$version" "$ROOT$RELEASES/current"
        fi
    elif [ "$cur" != "$version" ]; then
        echo "    $RELEASES/current is $cur (a fleet update): kept; the supervisor runs it"
    fi
}

docs() {
    log "documentation in $DOCS"
    local f
    while IFS= read -r f; do
        put 0644 "$SRC/docs/$f" "$DOCS/$f"
    done < <(cd "$SRC/docs" && find . -type f -printf '%P\n' | LC_ALL=C sort)
}

# --- configuration and credentials ---------------------------------------------------
configuration() {
    log "configuration in $CONFIG_FILE (linked from $CONFIG_LINK), secrets in /etc/madoguchi/credentials"
    dir 0755 /etc/madoguchi
    dir 0755 /etc/madoguchi/device_profiles
    # agent.toml lives in the service's state directory, where remote configuration
    # (cmd/config, docs/fleet.md) can write it: the service sees /etc read-only. The
    # technician reads and edits it as /etc/madoguchi/agent.toml, a relative link.
    state_dirs
    if [ ! -L "$ROOT$CONFIG_LINK" ] && [ -f "$ROOT$CONFIG_LINK" ] && [ ! -e "$ROOT$CONFIG_FILE" ]; then
        change "move $CONFIG_LINK to $CONFIG_FILE (kept as it is)"
        [ "$DRY" = 1 ] || mv "$ROOT$CONFIG_LINK" "$ROOT$CONFIG_FILE"
    fi
    if [ -n "$CONFIG" ]; then
        put 0600 "$CONFIG" "$CONFIG_FILE"
        # Station-local device profiles travel with the config.
        local profile
        for profile in "$(dirname "$CONFIG")"/device_profiles/*.toml; do
            if [ -f "$profile" ]; then
                put 0644 "$profile" "/etc/madoguchi/device_profiles/$(basename "$profile")"
            fi
        done
    elif [ ! -e "$ROOT$CONFIG_FILE" ]; then
        put 0600 "$SRC/provisioning/agent.example.toml" "$CONFIG_FILE"
        echo "    (an example /etc/madoguchi/agent.toml: edit it for this station)"
    fi
    # The agent reads and (remote configuration) rewrites it as $USER_NAME.
    chmod_if 0600 "$CONFIG_FILE"
    owner_of "$CONFIG_FILE"
    if [ "$(readlink "$ROOT$CONFIG_LINK" 2>/dev/null)" != "$CONFIG_LINK_TARGET" ]; then
        change "link $CONFIG_LINK -> $CONFIG_LINK_TARGET"
        [ "$DRY" = 1 ] || ln -sfn "$CONFIG_LINK_TARGET" "$ROOT$CONFIG_LINK"
    fi
    if [ -n "$CA" ]; then
        put 0644 "$CA" /etc/madoguchi/ca.crt
    fi

    # Root-only; systemd hands copies to the running agent (LoadCredential=).
    dir 0700 /etc/madoguchi/credentials
    secret 0600 /etc/madoguchi/credentials/data.key "" 32 "a new data key (encrypts personal data at rest)"
    chmod_if 0600 /etc/madoguchi/credentials/tls.key
    chmod_if 0644 /etc/madoguchi/credentials/tls.crt
    chmod_if 0644 /etc/madoguchi/credentials/tls.csr
}

# --- devices -----------------------------------------------------------------------------
RULES_CHANGED=0
devices() {
    log "udev rules for the scanners named in agent.toml"
    local cfg=$ROOT/etc/madoguchi/agent.toml before=$CHANGES
    [ "$DRY" = 1 ] && [ -n "$CONFIG" ] && cfg=$CONFIG
    [ -e "$cfg" ] || cfg=$SRC/provisioning/agent.example.toml
    python3 "$SRC/provisioning/udev_rules.py" --config "$cfg" \
        --group "$USER_NAME" \
        --profile-dir "$ROOT/etc/madoguchi/device_profiles" \
        --profile-dir "$SRC/device_profiles" >"$TMP/rules" \
        || die "could not make the udev rules from $cfg"
    put 0644 "$TMP/rules" /etc/udev/rules.d/70-madoguchi.rules
    put 0644 "$SRC/provisioning/polkit-pcscd.rules" /etc/polkit-1/rules.d/60-madoguchi-pcscd.rules
    if [ "$CHANGES" != "$before" ]; then
        RULES_CHANGED=1
        host udevadm control --reload
        host udevadm trigger --action=change --subsystem-match=tty --subsystem-match=input
    fi
}

# --- the kiosk -------------------------------------------------------------------------------
kiosk() {
    log "kiosk: user $KIOSK_USER, group $KIOSK_GROUP, token, Chromium launcher"
    group "$KIOSK_GROUP"
    if ! on_host getent passwd "$KIOSK_USER" >/dev/null; then
        [ -z "$ROOT" ] && change "add user $KIOSK_USER (the kiosk's desktop session)"
        host useradd --create-home --gid "$KIOSK_GROUP" --shell /bin/bash \
            --comment "madoguchi kiosk (desktop autologin)" "$KIOSK_USER"
    elif ! on_host id -nG "$KIOSK_USER" | tr ' ' '\n' | grep -qx "$KIOSK_GROUP"; then
        [ -z "$ROOT" ] && change "add $KIOSK_USER to group $KIOSK_GROUP"
        host usermod -aG "$KIOSK_GROUP" "$KIOSK_USER"
    fi
    # The token lives outside the agent's 0700 state directory: readable by the
    # kiosk group, handed to the agent by systemd (LoadCredential=, drop-in below).
    dir 0750 /etc/madoguchi/kiosk "$KIOSK_GROUP"
    secret 0640 "$KIOSK_TOKEN" "$KIOSK_GROUP" token "the kiosk API token"
    text 0644 /etc/systemd/system/madoguchi.service.d/kiosk.conf <<EOF
# Written by install.sh --kiosk: the kiosk API token, readable by group $KIOSK_GROUP
# in $KIOSK_TOKEN, reaches the agent as
# /run/credentials/madoguchi.service/api-token (agent.toml: [api] token_file).
[Service]
LoadCredential=api-token:$KIOSK_TOKEN
EOF
    sed -e "s|@PORT@|${API_PORT:-8765}|g" -e "s|@TOKEN@|$KIOSK_TOKEN|g" \
        -e "s|@USER@|$KIOSK_USER|g" "$SRC/provisioning/kiosk/madoguchi-kiosk" \
        | text 0755 /usr/local/bin/madoguchi-kiosk
    put 0644 "$SRC/provisioning/kiosk/madoguchi-kiosk.desktop" /etc/xdg/autostart/madoguchi-kiosk.desktop
}

# --- the service ---------------------------------------------------------------------------
UNITS_BEFORE=0
service() {
    log "systemd unit madoguchi.service"
    local before=$UNITS_BEFORE
    put 0644 "$SRC/systemd/madoguchi.service" /etc/systemd/system/madoguchi.service
    if [ "$CHANGES" != "$before" ]; then host systemctl daemon-reload; fi
    if ! on_host systemctl is-enabled --quiet madoguchi.service 2>/dev/null; then
        [ -z "$ROOT" ] && change "enable madoguchi.service"
        host systemctl enable madoguchi.service
    fi
    if [ ! -e "$ROOT/etc/madoguchi/credentials/tls.crt" ]; then
        cat <<NEXT
    not started yet: the station has no certificate. Next:
      $VENV/bin/madoguchi enroll --site SITE --name NAME
      (send /etc/madoguchi/credentials/tls.csr to the fleet CA, get the certificate back)
      $VENV/bin/madoguchi enroll --install station.crt
      systemctl start madoguchi
NEXT
    elif [ "$CHANGES" != 0 ] || [ "$RULES_CHANGED" = 1 ]; then
        host systemctl restart madoguchi.service
    fi
}

umask 022
prepare
if [ -n "$CONFIG" ]; then
    check_config "$CONFIG"
elif [ -e "$ROOT/etc/madoguchi/agent.toml" ]; then
    check_config "$ROOT/etc/madoguchi/agent.toml"
else
    check_config "$SRC/provisioning/agent.example.toml"
fi
[ "$DRY" = 1 ] && log "dry run: nothing below is changed"
packages
service_user
program
releases
docs
configuration
devices
UNITS_BEFORE=$CHANGES  # the kiosk's drop-in is part of the unit too
[ "$KIOSK" = 1 ] && kiosk
service
where="${ROOT:+ into $ROOT (the host was not changed)}"
if [ "$CHANGES" = 0 ]; then
    log "nothing to change$where"
elif [ "$DRY" = 1 ]; then
    log "dry run: $CHANGES change(s) listed, none made$where"
else
    log "done: $CHANGES change(s)$where"
fi
