#!/bin/bash
# The container's command: make sure the test tokens exist, then serve them over
# p11-kit's RPC on a unix socket in /run/p11 (a directory the host bind-mounts).
#
# PINs come from files the host writes into /janus/pins (mounted read-only), and reach
# softhsm2-util on its stdin, never its argv. Restarting the container keeps the tokens.
set -euo pipefail

module=/usr/lib/softhsm/libsofthsm2.so
socket=/run/p11/p11kit.sock
labels=(${JANUS_TOKENS:-janus-test})

has_token() {
    softhsm2-util --show-slots 2>/dev/null | grep -qE "^ +Label: +$1 *$"
}

uris=()
for label in "${labels[@]}"; do
    if ! has_token "$label"; then
        so=$(cat "/janus/pins/$label.so.pin")
        user=$(cat "/janus/pins/$label.user.pin")
        # softhsm2-util reads PINs from a terminal only; script(1) gives it one. Its
        # output echoes what it was typed, so it goes nowhere.
        if ! printf '%s\n%s\n%s\n%s\n' "$so" "$so" "$user" "$user" \
            | script -qec "softhsm2-util --init-token --free --label $label" /dev/null \
                >/dev/null 2>&1; then
            echo "token-server: could not initialise token $label" >&2
            exit 1
        fi
    fi
    uris+=("pkcs11:token=$label")
done

rm -f "$socket"
# p11-kit 0.25.5 from /opt/p11-kit (build-p11-kit.sh), not the image's 0.24: only 0.25
# carries ECDH over the RPC.  Its server runs its own p11-kit-remote per connection.
p11_kit=/opt/p11-kit
export LD_LIBRARY_PATH=$p11_kit/lib P11_KIT_PRIVATEDIR=$p11_kit/libexec/p11-kit
exec "$p11_kit/libexec/p11-kit/p11-kit-server" -f --provider "$module" -n "$socket" "${uris[@]}"
