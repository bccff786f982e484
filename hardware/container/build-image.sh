#!/usr/bin/env bash
# Builds the SoftHSM test image from Debian packages alone (no registry): mmdebstrap
# writes a minimal bookworm root file system with SoftHSM2 and p11-kit to a tar stream,
# which `podman import` turns into an image.  p11-kit 0.25.5, built from Debian's source
# by build-p11-kit.sh (bookworm's 0.24 cannot carry ECDH over its RPC), is copied in at
# /opt/p11-kit; the container serves the tokens with its p11-kit-server.
#
# Idempotent: the image carries a label with the hash of its build inputs (these
# scripts and the p11-kit build's stamp); when an image with that label exists, nothing
# is done (a fraction of a second).
# Usage: hardware/container/build-image.sh [--engine podman|docker] [--force]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${JANUS_SOFTHSM_IMAGE:-localhost/janus-softhsm:latest}
engine=${JANUS_CONTAINER_ENGINE:-podman}
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) engine=$2; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "usage: $0 [--engine podman|docker] [--force]" >&2; exit 2 ;;
    esac
done
if [ "$engine" = podman ]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
fi
command -v "$engine" >/dev/null || { echo "janus: $engine is not installed (make system)" >&2; exit 1; }

# Instant when p11-kit is built already; the host's p11-kit-client.so comes from it too.
p11_kit=$(bash "$here/build-p11-kit.sh")
inputs=$(cat "$here/build-image.sh" "$here/token-server.sh" "$p11_kit/.janus-stamp" \
    | sha256sum | cut -c1-16)
current=$("$engine" image inspect --format '{{ index .Config.Labels "org.janus.inputs" }}' \
    "$image" 2>/dev/null || true)
if [ "$force" -eq 0 ] && [ "$current" = "$inputs" ]; then
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "janus: mmdebstrap is not installed (make system)" >&2; exit 1; }

old_id=$("$engine" image inspect --format '{{ .Id }}' "$image" 2>/dev/null || true)
quiet=()
[ "$engine" = podman ] && quiet=(--quiet)
echo "janus: building container image $image (Debian packages via mmdebstrap)"
# Documentation, man pages and translations are dropped: the image only runs two programs.
mmdebstrap --quiet --variant=minbase --include=softhsm2,p11-kit \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='mkdir -p "$1/run/p11" "$1/janus/pins" "$1/opt/p11-kit"' \
    --customize-hook="copy-in $here/token-server.sh /usr/local/bin" \
    --customize-hook="sync-in $p11_kit /opt/p11-kit" \
    --customize-hook='rm -rf "$1/opt/p11-kit/include" "$1/opt/p11-kit/lib/pkgconfig"' \
    --customize-hook='rm -rf "$1/var/cache/apt"/*.bin "$1/var/lib/apt/lists"/*' \
    bookworm - \
    | "$engine" import "${quiet[@]}" \
        --change 'CMD ["/usr/local/bin/token-server.sh"]' \
        --change "LABEL org.janus.inputs=$inputs" \
        - "$image" >/dev/null
# The image it replaces is now untagged: remove it unless a container still uses it.
if [ -n "$old_id" ]; then
    "$engine" image rm "$old_id" >/dev/null 2>&1 || true
fi
echo "janus: built $image"
