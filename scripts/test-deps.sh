#!/usr/bin/env bash
# The system tools the tests need, installed with apt where one is missing: OpenSSH's
# server and client (every end-to-end test talks to a real sshd), rsync and unison (the
# benchmarks' baselines), systemd (the unit files), util-linux and iproute2 (network
# namespaces for the link-fault tests), git. Does nothing when all are there.
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
for pair in ssh:openssh-client ssh-keygen:openssh-client rsync:rsync unison:unison systemctl:systemd \
            unshare:util-linux ip:iproute2 git:git; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done

if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo -n"
    fi
    mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "--- apt: ${packages[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" </dev/null >/dev/null
fi
# sshd's privilege separation directory (normally created by its service unit).
if [ ! -d /run/sshd ]; then
    if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; else sudo -n mkdir -p /run/sshd || true; fi
fi
