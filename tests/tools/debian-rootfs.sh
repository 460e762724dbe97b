#!/usr/bin/env bash
# Usage: debian-rootfs.sh FLAVOUR [ARCH]   ->  prints the path of a rootfs tarball
#
# One Debian 12 (bookworm) root filesystem per flavour and architecture, built once per
# machine with debootstrap from Debian's own packages and kept as a tarball under
# $KNOCKER_ROOTFS_CACHE (default /var/cache/knocker-ci). Every real-environment test of
# this run (the container image's stand-in base, the booted systemd machine) starts from
# one of these tarballs, so a CI run bootstraps each flavour at most once.
#
# Flavours:
#   python   minbase + python3, python3-venv, python3-pip, ca-certificates: the stand-in
#            for the official python:3.11-slim image (CI only; users pull the real one)
#   systemd  python + systemd, systemd-sysv, dbus, polkitd, firewalld, iproute2, procps,
#            curl, sudo, netbase (/etc/protocols: firewalld's stock services name `esp`),
#            ...: a Debian host to boot with `systemd-nspawn --boot`; its tarball's name
#            carries a digest of the package list, so changing the list rebuilds it
#   valkey   python + Valkey 8 from Debian 13 (tests/tools/fetch-valkey.sh's tree, run by
#            its own glibc's loader) as valkey-server / valkey-cli, a valkey user and a
#            /data it owns: the stand-in for the valkey/valkey:8 image (bookworm has no
#            valkey package); amd64 only; the tarball's name carries Valkey's version
# ARCH is a Debian architecture (amd64, arm64, armhf); default: the host's. A foreign
# architecture needs qemu-user-static with binfmt_misc registered (debootstrap --foreign
# is not used: qemu-user-static's F flag lets the chroot run the second stage directly).
set -euo pipefail

flavour=${1:?usage: debian-rootfs.sh python|systemd|valkey [ARCH]}
arch=${2:-$(dpkg --print-architecture)}
cache=${KNOCKER_ROOTFS_CACHE:-/var/cache/knocker-ci}
mirror=${KNOCKER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
python_packages=python3,python3-venv,python3-pip,ca-certificates
systemd_packages=(systemd systemd-sysv dbus polkitd firewalld iproute2 procps curl sudo
                  libpam-systemd python3-dbus netbase)
valkey_tree=${KNOCKER_FWLAB_CACHE:-/var/cache/knocker-tests}/valkey-trixie

tag=
[ "$flavour" = systemd ] && tag=-$(printf '%s\n' "${systemd_packages[@]}" | sha256sum | cut -c1-8)
if [ "$flavour" = valkey ]; then
    [ -x "$valkey_tree/bin/valkey-server" ] || bash "$(dirname "$0")/fetch-valkey.sh" >&2
    [ -x "$valkey_tree/bin/valkey-server" ] || { echo "no Valkey in $valkey_tree" >&2; exit 1; }
    tag=-$(sha256sum "$valkey_tree/VERSION" "$0" | sha256sum | cut -c1-8)
fi
out="$cache/bookworm-$flavour$tag-$arch.tar"
[ -s "$out" ] && { echo "$out"; exit 0; }
mkdir -p "$cache"
command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }

# A foreign architecture runs through qemu-user-static. binfmt_misc is not mounted on
# every machine; Debian's /usr/lib/binfmt.d/qemu-*.conf lines carry the F (fix binary)
# flag, so once registered the interpreter also works inside chroots and containers.
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    case "$arch" in
        arm64) qemu=aarch64 ;;
        armhf|armel) qemu=arm ;;
        *) qemu=$arch ;;
    esac
    [ -e /usr/lib/binfmt.d/qemu-$qemu.conf ] || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static >/dev/null; }
    [ -e /proc/sys/fs/binfmt_misc/register ] \
        || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ] \
        || cat "/usr/lib/binfmt.d/qemu-$qemu.conf" >/proc/sys/fs/binfmt_misc/register
fi

# A lock: two tests of one run may ask for the same tarball at once.
exec 9>"$out.lock"
flock 9
[ -s "$out" ] && { echo "$out"; exit 0; }

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'umount -R "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
root="$work/root"
case "$flavour" in
    python)
        debootstrap --variant=minbase --arch="$arch" --include="$python_packages" \
            bookworm "$root" "$mirror" >"$work/log" 2>&1 \
            || { tail -20 "$work/log" >&2; exit 1; }
        # the official image has `python` and `pip` on PATH
        ln -sf python3 "$root/usr/bin/python"
        ln -sf pip3 "$root/usr/bin/pip"
        rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
        ;;
    valkey)
        base=$("$0" python "$arch")
        mkdir -p "$root"
        tar -C "$root" -xf "$base"
        cp -a "$valkey_tree/root" "$root/opt/valkey"
        for tool in valkey-server valkey-cli; do
            cat >"$root/usr/local/bin/$tool" <<WRAPPER
#!/bin/sh
exec /opt/valkey/usr/lib64/ld-linux-x86-64.so.2 \\
    --library-path /opt/valkey/usr/lib/x86_64-linux-gnu:/opt/valkey/lib/x86_64-linux-gnu \\
    /opt/valkey/usr/bin/$tool "\$@"
WRAPPER
            chmod 755 "$root/usr/local/bin/$tool"
        done
        # The valkey image's server user, working directory and volume (a fresh named
        # volume starts as a copy of /data).
        chroot "$root" useradd --system --user-group --home-dir /data --no-create-home valkey
        mkdir -p "$root/data"
        chroot "$root" chown valkey:valkey /data
        chroot "$root" valkey-server --version >&2
        ;;
    systemd)
        base=$("$0" python "$arch")
        mkdir -p "$root"
        tar -C "$root" -xf "$base"
        cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
        printf 'deb %s bookworm main\n' "$mirror" >"$root/etc/apt/sources.list"
        printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
        chmod +x "$root/usr/sbin/policy-rc.d"
        packages=("${systemd_packages[@]}")
        mount -t proc proc "$root/proc"
        chroot "$root" apt-get update -q >"$work/log" 2>&1 \
            && DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -q \
                --no-install-recommends "${packages[@]}" >>"$work/log" 2>&1 \
            || { tail -20 "$work/log" >&2; exit 1; }
        umount "$root/proc"
        rm -f "$root/usr/sbin/policy-rc.d"
        rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
        : >"$root/etc/machine-id"
        ;;
    *) echo "unknown flavour: $flavour" >&2; exit 2 ;;
esac
tar -C "$root" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "$out"
