#!/usr/bin/env bash
# Install the Debian packages the test suite drives for real: the reverse proxies,
# firewalld and what it runs on, a headless browser, systemd-analyze, systemd-nspawn,
# fail2ban-regex, Podman (rootful, runc, netavark) with qemu-user-static for the
# container image tests. Only what is
# missing is installed, with one apt-get run. Services are never started by the install
# (policy-rc.d answers 101, "action forbidden"): the tests start what they need on
# loopback or inside their own network namespaces.
set -euo pipefail

# command -> Debian package
declare -A wanted=(
    [caddy]=caddy
    [nginx]=nginx
    [haproxy]=haproxy
    [firewalld]=firewalld
    [nft]=nftables
    [dbus-daemon]=dbus-daemon
    [ip]=iproute2
    [unshare]=util-linux
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [systemd-analyze]=systemd
    [systemd-nspawn]=systemd-container
    [nsenter]=util-linux
    [kill]=procps
    [fail2ban-regex]=fail2ban
    [podman]=podman
    [buildah]=buildah
    [runc]=runc
    [debootstrap]=debootstrap
    [qemu-aarch64-static]=qemu-user-static
    [iptables]=iptables
    [curl]=curl
    [redis-server]=redis-server
    [openssl]=openssl
)
missing=()
for command in "${!wanted[@]}"; do
    if ! command -v "$command" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$command" ]; then
        missing+=("${wanted[$command]}")
    fi
done
# firewalld's own Python modules come from Debian (it runs on /usr/bin/python3)
if ! /usr/bin/python3 -c 'import firewall, dbus, gi, nftables' >/dev/null 2>&1; then
    missing+=(firewalld python3-dbus python3-gi python3-nftables)
fi
# Podman's network stack lives outside PATH: netavark (needs iptables) and aardvark-dns
# (service names such as knocker:8000 on a compose network).
if ! [ -x /usr/lib/podman/netavark ] || ! [ -x /usr/lib/podman/aardvark-dns ]; then
    missing+=(netavark aardvark-dns)
fi
[ ${#missing[@]} -eq 0 ] && { echo "test dependencies: all present"; exit 0; }

if [ "$(id -u)" != 0 ]; then
    echo "test dependencies missing (run as root to install): ${missing[*]}" >&2
    exit 0  # the tests that need them skip locally and fail under CI=true
fi
echo "installing test dependencies: ${missing[*]}"
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
echo "test dependencies installed"
