#!/bin/bash
# Provision a madoguchi station: Raspberry Pi OS Bookworm or Debian 12.
#
#   sudo provisioning/install.sh --config station.toml [--ca fleet-ca.crt]
#   provisioning/install.sh --root /tmp/pi-root --config station.toml   # dry install
#
# Idempotent: running it again gives the same files, modes and owners. It never
# overwrites a key, and keeps an existing agent.toml unless --config is given.
# With --root DIR every file goes below DIR and nothing on the host changes:
# apt-get, useradd, chown to the service user, pip, udevadm and systemctl are
# printed as "would run: ..." instead.
set -euo pipefail

USER_NAME=madoguchi
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
CONFIG=""
CA=""
EXTRAS="serial,hid,card,interpret,camera"

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --ca) CA=${2:?--ca needs a file}; shift 2 ;;
        --source) SRC=${2:?--source needs a directory}; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
done

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    if [ "$ROOT" = / ]; then
        echo "install.sh: --root / is the host; run without --root instead" >&2
        exit 2
    fi
elif [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or use --root DIR for a dry install)" >&2
    exit 1
fi
for f in "$CONFIG" "$CA"; do
    if [ -n "$f" ] && [ ! -r "$f" ]; then
        echo "install.sh: cannot read $f" >&2
        exit 1
    fi
done

log() { printf '==> %s\n' "$*"; }

# Commands that change the host: run them, or in --root mode only say so.
host() {
    if [ -n "$ROOT" ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# put MODE SOURCE DEST: install a file under the root, atomically, root-owned.
put() {
    local mode=$1 src=$2 dest=$ROOT$3 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.install.XXXXXX")
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

# dir MODE PATH
dir() {
    mkdir -p "$ROOT$2"
    chmod "$1" "$ROOT$2"
}

# --- packages -------------------------------------------------------------------
packages() {
    local pkgs=(pcscd mosquitto-clients python3 python3-venv python3-dev gcc swig libpcsclite-dev)
    if [ -z "$ROOT" ] && apt-cache show python3-picamera2 >/dev/null 2>&1; then
        pkgs+=(python3-picamera2)  # Raspberry Pi OS only: camera stations
    fi
    log "system packages: ${pkgs[*]}"
    host env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    if [ -n "$ROOT" ]; then
        echo "would run: apt-get install python3-picamera2 (where the archive has it)"
    fi
}

# --- service user ----------------------------------------------------------------
service_user() {
    log "user $USER_NAME (system, no login) and device groups"
    local g
    for g in input dialout video; do
        if [ -n "$ROOT" ] || ! getent group "$g" >/dev/null; then
            host groupadd --system -f "$g"
        fi
    done
    if [ -n "$ROOT" ] || ! getent passwd "$USER_NAME" >/dev/null; then
        host useradd --system --user-group --home-dir /var/lib/madoguchi --no-create-home \
            --shell /usr/sbin/nologin --comment "madoguchi station agent" "$USER_NAME"
    fi
}

# --- the program -------------------------------------------------------------------
program() {
    log "source in /opt/madoguchi/src, venv in /opt/madoguchi/venv"
    dir 0755 /opt/madoguchi
    rm -rf "$ROOT/opt/madoguchi/src"
    dir 0755 /opt/madoguchi/src
    local f
    while IFS= read -r f; do
        put 0644 "$SRC/$f" "/opt/madoguchi/src/$f"
    done < <(cd "$SRC" && find pyproject.toml agent device_profiles docs systemd provisioning \
        -name __pycache__ -prune -o -type f -print 2>/dev/null | LC_ALL=C sort)
    chmod 0755 "$ROOT/opt/madoguchi/src/provisioning/install.sh" \
        "$ROOT/opt/madoguchi/src/provisioning/udev_rules.py"
    # --system-site-packages: picamera2 and libcamera come from apt, not PyPI.
    host python3 -m venv --system-site-packages /opt/madoguchi/venv
    # Editable, so that the bundled device_profiles/ next to agent/ are found;
    # byte-compiled now because the service sees /opt read-only.
    host /opt/madoguchi/venv/bin/pip install --quiet --upgrade -e "/opt/madoguchi/src[$EXTRAS]"
    host /opt/madoguchi/venv/bin/python -m compileall -q /opt/madoguchi/src/agent
}

# --- configuration and credentials ---------------------------------------------------
configuration() {
    log "configuration in /etc/madoguchi, secrets in /etc/madoguchi/credentials"
    dir 0755 /etc/madoguchi
    dir 0755 /etc/madoguchi/device_profiles
    if [ -n "$CONFIG" ]; then
        put 0640 "$CONFIG" /etc/madoguchi/agent.toml
        # Station-local device profiles travel with the config.
        local profile
        for profile in "$(dirname "$CONFIG")"/device_profiles/*.toml; do
            if [ -f "$profile" ]; then
                put 0644 "$profile" "/etc/madoguchi/device_profiles/$(basename "$profile")"
            fi
        done
    elif [ ! -e "$ROOT/etc/madoguchi/agent.toml" ]; then
        put 0640 "$SRC/provisioning/agent.example.toml" /etc/madoguchi/agent.toml
        echo "    installed an example /etc/madoguchi/agent.toml: edit it for this station"
    fi
    chmod 0640 "$ROOT/etc/madoguchi/agent.toml"
    # The agent reads its config as $USER_NAME; nobody else needs to.
    host chgrp "$USER_NAME" /etc/madoguchi/agent.toml
    if [ -n "$CA" ]; then
        put 0644 "$CA" /etc/madoguchi/ca.crt
    fi

    # Root-only; systemd hands copies to the running agent (LoadCredential=).
    dir 0700 /etc/madoguchi/credentials
    local key=$ROOT/etc/madoguchi/credentials/data.key
    if [ ! -s "$key" ]; then
        (umask 077 && head -c 32 /dev/urandom >"$key.tmp" && mv -f "$key.tmp" "$key")
        echo "    made a new data key (encrypts personal data at rest)"
    fi
    local f
    for f in data.key tls.key; do
        if [ -e "$ROOT/etc/madoguchi/credentials/$f" ]; then
            chmod 0600 "$ROOT/etc/madoguchi/credentials/$f"
        fi
    done
    for f in tls.crt tls.csr; do
        if [ -e "$ROOT/etc/madoguchi/credentials/$f" ]; then
            chmod 0644 "$ROOT/etc/madoguchi/credentials/$f"
        fi
    done
}

# --- devices -----------------------------------------------------------------------------
devices() {
    log "udev rules for the scanners named in agent.toml"
    local tmp
    tmp=$(mktemp)
    python3 "$SRC/provisioning/udev_rules.py" --config "$ROOT/etc/madoguchi/agent.toml" \
        --group "$USER_NAME" \
        --profile-dir "$ROOT/etc/madoguchi/device_profiles" \
        --profile-dir "$ROOT/opt/madoguchi/src/device_profiles" >"$tmp"
    put 0644 "$tmp" /etc/udev/rules.d/70-madoguchi.rules
    rm -f "$tmp"
    put 0644 "$SRC/provisioning/polkit-pcscd.rules" /etc/polkit-1/rules.d/60-madoguchi-pcscd.rules
    host udevadm control --reload
    host udevadm trigger --action=change --subsystem-match=tty --subsystem-match=input
}

# --- the service ---------------------------------------------------------------------------
service() {
    log "systemd unit madoguchi.service"
    put 0644 "$SRC/systemd/madoguchi.service" /etc/systemd/system/madoguchi.service
    host systemctl daemon-reload
    host systemctl enable madoguchi.service
    if [ -e "$ROOT/etc/madoguchi/credentials/tls.crt" ]; then
        host systemctl restart madoguchi.service
    else
        cat <<NEXT
    not started yet: the station has no certificate. Next:
      /opt/madoguchi/venv/bin/madoguchi enroll --site SITE --name NAME
      (send /etc/madoguchi/credentials/tls.csr to the fleet CA, get the certificate back)
      /opt/madoguchi/venv/bin/madoguchi enroll --install station.crt
      systemctl start madoguchi
NEXT
    fi
}

umask 022
packages
service_user
program
configuration
devices
service
log "done${ROOT:+ (into $ROOT; the host was not changed)}"
