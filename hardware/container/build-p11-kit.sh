#!/usr/bin/env bash
# Builds p11-kit 0.25.5 from Debian's own source tarball into a private prefix
# (default .state/p11-kit-0.25.5), never over the system's p11-kit.
#
# Why: p11-kit's RPC only carries the mechanisms whose parameters it knows how to
# serialise.  Debian bookworm's 0.24.1 has no CKM_ECDH1_DERIVE, so ECDH cannot reach a
# token behind `p11-kit server`; 0.25 (Debian trixie's version) carries it.  The host
# loads this build's p11-kit-client.so, the container runs this build's p11-kit-server
# (the image is bookworm too, so the same glibc).
#
# Idempotent: the prefix holds a stamp naming the version, the tarball's sha256 and the
# build options; when it matches, nothing is done.  The tarball is checked against a
# pinned sha256 and refused on mismatch.  Prints the prefix on stdout.
# Usage: hardware/container/build-p11-kit.sh [PREFIX]
set -euo pipefail

version=0.25.5
sha256=04d0a86450cdb1be018f26af6699857171a188ac6d5b8c90786a60854e1198e5
# Another mirror (or a local copy, file://…) may be named; the sha256 is checked anyway.
url=${JANUS_P11_KIT_URL:-http://deb.debian.org/debian/pool/main/p/p11-kit/p11-kit_${version}.orig.tar.xz}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
prefix=${1:-$root/.state/p11-kit-$version}
mkdir -p "$(dirname "$prefix")"
prefix=$(cd "$(dirname "$prefix")" && pwd)/$(basename "$prefix")
downloads=${JANUS_DOWNLOADS:-$root/.state/downloads}
tarball=$downloads/p11-kit_${version}.orig.tar.xz

# Only what the RPC needs: the client module, the server and the library they share.
# No trust module (no libtasn1), no systemd socket activation, no translations, docs
# or test programs.  libdir is fixed so the paths below do not depend on the distro.
options=(
    --buildtype=release --libdir=lib
    -Dtrust_module=disabled -Dsystemd=disabled -Dbash_completion=disabled
    -Dnls=false -Dman=false -Dgtk_doc=false -Dtest=false -Dlibffi=enabled
)
stamp_text="p11-kit $version sha256=$sha256 options=${options[*]}"
stamp=$prefix/.janus-stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
    echo "$prefix"
    exit 0
fi

# One build at a time (make and a test session may both ask for it).
mkdir -p "$downloads"
exec 9>"$prefix.lock"
flock 9
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
    echo "$prefix"
    exit 0
fi

for tool in meson ninja pkg-config cc curl; do
    command -v "$tool" >/dev/null || {
        echo "janus: $tool is not installed (make system)" >&2
        exit 1
    }
done

verify() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }
if [ ! -f "$tarball" ] || ! verify "$tarball"; then
    echo "janus: downloading $url" >&2
    curl -fsSL --retry 3 -o "$tarball.tmp" "$url"
    if ! verify "$tarball.tmp"; then
        got=$(sha256sum "$tarball.tmp" | cut -d' ' -f1)
        rm -f "$tarball.tmp"
        echo "janus: error: $url has sha256 $got, expected $sha256; refusing to build it" >&2
        exit 1
    fi
    mv "$tarball.tmp" "$tarball"
fi

echo "janus: building p11-kit $version into $prefix" >&2
work=$(mktemp -d "$prefix.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xJf "$tarball" -C "$work"
src=$work/p11-kit-$version
# Installed into a staging copy first, then moved into place: an interrupted build
# never leaves a prefix that looks finished.
meson setup --prefix="$prefix" "${options[@]}" "$src" "$work/build" >"$work/log" 2>&1 \
    && ninja -C "$work/build" >>"$work/log" 2>&1 \
    && DESTDIR="$work/stage" meson install -C "$work/build" >>"$work/log" 2>&1 \
    || { tail -20 "$work/log" >&2; echo "janus: error: building p11-kit failed" >&2; exit 1; }
rm -rf "$prefix"
mv "$work/stage$prefix" "$prefix"
printf '%s\n' "$stamp_text" >"$stamp"
echo "$prefix"
