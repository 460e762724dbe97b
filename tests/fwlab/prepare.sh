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

mirror=${KNOCKER_FWLAB_MIRROR:-}
if [[ -z $mirror ]]; then
    # The mirror this machine already uses: first URIs: of a deb822 source, else the
    # first one-line "deb" source, else Debian's own redirector.
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [[ -z $mirror && -r /etc/apt/sources.list ]]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit } $1 == "deb" { print $3; exit }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
# a security mirror cannot serve trixie main
[[ $mirror == *debian-security* ]] && mirror=http://deb.debian.org/debian

work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
apt_state=$CACHE/trixie-apt
mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial" "$work/debs" "$work/root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
    >"$apt_state/sources.list"
# Private sources/lists/cache: the machine's own apt configuration stays as it is.
# APT::Sandbox::User=root: the _apt user could not write into these root-owned folders.
apt_opts=(-o "Dir::Etc::sourcelist=$apt_state/sources.list" -o Dir::Etc::sourceparts=-
          -o "Dir::State::Lists=$apt_state/lists" -o "Dir::Cache=$apt_state/cache"
          -o APT::Sandbox::User=root -q)
echo "prepare.sh: fetching firewalld + python3-firewall from trixie ($mirror)"
apt-get "${apt_opts[@]}" update
(cd "$work/debs" && apt-get "${apt_opts[@]}" download firewalld python3-firewall)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
dpkg-deb -f "$work"/debs/firewalld_*.deb Version >"$work/VERSION"
[[ -x $work/root/usr/sbin/firewalld ]] || { echo "prepare.sh: extracted tree has no usr/sbin/firewalld" >&2; exit 1; }
rm -rf "$V2.old"
[[ -d $V2 ]] && mv "$V2" "$V2.old"
mkdir -p "$V2"
mv "$work/root" "$work/debs" "$work/VERSION" "$V2/"
rm -rf "$V2.old"
echo "prepare.sh: firewalld $(cat "$V2/VERSION") extracted into $V2/root"
