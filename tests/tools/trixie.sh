# Sourced by the scripts that take a few packages from Debian 13 (trixie) without
# installing them: a private apt state (sources, lists, cache) under the cache directory,
# `apt-get download`, `dpkg-deb -x`. The machine's own apt sources, lists and dpkg
# database are only read.
#
#   trixie_fetch DEST PACKAGE...   extract PACKAGE... into DEST/root (replacing it) and
#                                  write the first package's version to DEST/VERSION
# env: KNOCKER_FWLAB_MIRROR  Debian mirror URL (default: the one this machine uses)

trixie_mirror() {
    local mirror=${KNOCKER_FWLAB_MIRROR:-}
    if [[ -z $mirror ]]; then
        # first URIs: of a deb822 source, else the first one-line "deb" source
        mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    fi
    if [[ -z $mirror && -r /etc/apt/sources.list ]]; then
        mirror=$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit } $1 == "deb" { print $3; exit }' /etc/apt/sources.list)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    # a security mirror cannot serve trixie main
    [[ $mirror == *debian-security* ]] && mirror=http://deb.debian.org/debian
    echo "$mirror"
}

trixie_fetch() {
    local dest=$1
    shift
    local cache work apt_state mirror
    cache=$(dirname "$dest")
    mirror=$(trixie_mirror)
    work=$(mktemp -d "$cache/.fetch.XXXXXX")
    apt_state=$cache/trixie-apt
    mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial" "$work/debs" "$work/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
        >"$apt_state/sources.list"
    # APT::Sandbox::User=root: the _apt user could not write into these root-owned folders.
    local apt_opts=(-o "Dir::Etc::sourcelist=$apt_state/sources.list" -o Dir::Etc::sourceparts=-
                    -o "Dir::State::Lists=$apt_state/lists" -o "Dir::Cache=$apt_state/cache"
                    -o APT::Sandbox::User=root -q)
    echo "fetching $* from trixie ($mirror)"
    apt-get "${apt_opts[@]}" update >/dev/null
    (cd "$work/debs" && apt-get "${apt_opts[@]}" download "$@" >/dev/null) || { rm -rf "$work"; return 1; }
    local deb
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    dpkg-deb -f "$work/debs/${1}_"*.deb Version >"$work/VERSION"
    rm -rf "$dest.old"
    [[ -d $dest ]] && mv "$dest" "$dest.old"
    mkdir -p "$dest"
    mv "$work/root" "$work/debs" "$work/VERSION" "$dest/"
    rm -rf "$dest.old" "$work"
}
