#!/bin/bash
# prepare.sh - everything the real-firewalld tests need on a Debian 12 machine, as root.
#
#   1. apt-installs firewalld (1.3.3 on bookworm), nftables, dbus, iproute2 and util-linux
#      when one of their commands is missing. Installing firewalld starts nothing on a
#      machine without systemd (its postinst only starts it under systemd); on a machine
#      WITH systemd the package's own service may start - the tests never use it.
#   2. Fetches Debian 13's firewalld 2.3.x (the arch:all `firewalld` and
#      `python3-firewall` .debs) with a private apt state directory and extracts them with
#      `dpkg-deb -x` into the cache. Nothing is installed: the tests run that tree with
#      bookworm's python3 and its python3-dbus/gi/nftables. The machine's apt sources,
#      lists and dpkg database are only read.
#
# usage: tests/fwlab/prepare.sh [--no-install] [--force]
#   --no-install  do not apt-get install missing packages (fetch 2.3.x only)
#   --force       fetch 2.3.x again even when the cache has it
# env:   KNOCKER_FWLAB_CACHE  cache directory (default /var/cache/knocker-tests); the
#        tests read the same variable.
#        KNOCKER_FWLAB_MIRROR Debian mirror URL (default: the one this machine uses)
set -euo pipefail

install=1 force=0
for arg in "$@"; do
    case $arg in
    --no-install) install=0 ;;
    --force) force=1 ;;
    *) echo "usage: $0 [--no-install] [--force]" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) != 0 ]]; then
    # Like make test-deps: not fatal here; the firewalld tests skip locally without it and
    # fail under CI=true.
    echo "prepare.sh: not root: skipped (the firewalld tests need root anyway)" >&2
    exit 0
fi

CACHE=${KNOCKER_FWLAB_CACHE:-/var/cache/knocker-tests}
V2=$CACHE/firewalld-trixie
mkdir -p "$CACHE"
# Two runs at once (make test in two shells) must not extract into the same tree.
exec 9>"$CACHE/.prepare.lock"
flock 9

# ------------------------------------------------------------------ 1. host packages
missing=()
for cmd in /usr/sbin/firewalld nft dbus-daemon ip unshare; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if ((${#missing[@]})); then
    if ((install)); then
        echo "prepare.sh: installing firewalld nftables dbus iproute2 util-linux (missing: ${missing[*]})"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            firewalld nftables dbus iproute2 util-linux
    else
        echo "prepare.sh: missing ${missing[*]} (run without --no-install)" >&2
        exit 1
    fi
fi

# ------------------------------------------------------------------ 2. firewalld 2.3.x
if [[ -x $V2/root/usr/sbin/firewalld && $force == 0 ]]; then
    echo "prepare.sh: firewalld from trixie already in $V2 ($(cat "$V2/VERSION" 2>/dev/null || echo '?'))"
    exit 0
fi

# shellcheck source=../tools/trixie.sh
source "$(dirname "$0")/../tools/trixie.sh"
trixie_fetch "$V2" firewalld python3-firewall
[[ -x $V2/root/usr/sbin/firewalld ]] || { echo "prepare.sh: extracted tree has no usr/sbin/firewalld" >&2; exit 1; }
echo "prepare.sh: firewalld $(cat "$V2/VERSION") extracted into $V2/root"
