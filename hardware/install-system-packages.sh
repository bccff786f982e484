#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Janus needs, and only those still missing,
# so that running it again is instant. Needs root (or sudo) the first time.
set -euo pipefail

missing=()
for pkg in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
echo "janus: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Refresh the package index only when a package is not known yet.
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
