#!/usr/bin/env bash
# Valkey for the redis-backend tests: bookworm has no valkey package, so this takes
# Debian 13's valkey-server 8.x and the libraries it links against (trixie's glibc among
# them) with tests/tools/trixie.sh, and writes wrappers that run it through that glibc's
# own loader. Nothing is installed; the machine's libraries are not touched.
#
#   $CACHE/valkey-trixie/bin/valkey-server, .../bin/valkey-cli   (CACHE: KNOCKER_FWLAB_CACHE,
#                                                               default /var/cache/knocker-tests)
# usage: tests/tools/fetch-valkey.sh [--force]
set -euo pipefail

force=0
[[ ${1:-} == --force ]] && force=1
if [[ $(id -u) != 0 ]]; then
    echo "fetch-valkey.sh: not root: skipped (the Valkey tests skip locally, fail under CI=true)" >&2
    exit 0
fi
if [[ $(dpkg --print-architecture) != amd64 ]]; then
    echo "fetch-valkey.sh: only amd64 is prepared (the loader path below is amd64's)" >&2
    exit 0
fi
CACHE=${KNOCKER_FWLAB_CACHE:-/var/cache/knocker-tests}
DEST=$CACHE/valkey-trixie
mkdir -p "$CACHE"
exec 9>"$CACHE/.valkey.lock"
flock 9
if [[ -x $DEST/bin/valkey-server && $force == 0 ]]; then
    echo "fetch-valkey.sh: valkey $(cat "$DEST/VERSION") already in $DEST"
    exit 0
fi

# shellcheck source=trixie.sh
source "$(dirname "$0")/trixie.sh"
trixie_fetch "$DEST" valkey-server valkey-tools libc6 libssl3t64 libsystemd0 libcap2 \
    libjemalloc2 liblzf1 libatomic1 libgcc-s1
mkdir -p "$DEST/bin"
for tool in valkey-server valkey-cli; do
    cat >"$DEST/bin/$tool" <<WRAPPER
#!/bin/sh
# $tool from Debian 13, run by its own glibc's loader (tests/tools/fetch-valkey.sh)
root=$DEST/root
exec "\$root/usr/lib64/ld-linux-x86-64.so.2" \\
    --library-path "\$root/usr/lib/x86_64-linux-gnu:\$root/lib/x86_64-linux-gnu" \\
    "\$root/usr/bin/$tool" "\$@"
WRAPPER
    chmod 755 "$DEST/bin/$tool"
done
"$DEST/bin/valkey-server" --version
