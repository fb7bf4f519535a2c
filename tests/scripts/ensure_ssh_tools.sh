#!/usr/bin/env bash
# sshd and rsync for the real `ray up` test (the local provider drives the head over SSH and uploads its
# files with rsync). Installs Debian's packages when missing and we are root; exit 3 when they cannot be had.
set -euo pipefail
missing=()
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v rsync > /dev/null || missing+=(rsync)
command -v ssh > /dev/null || missing+=(openssh-client)
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get > /dev/null; then
    echo "missing ${missing[*]} and cannot apt-get install them (not root or not Debian)" >&2
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
# The package's postinst would start a system-wide sshd on port 22: a policy-rc.d that denies service
# starts (Debian's documented switch; Docker's Debian images ship one) keeps it from running. The test
# starts its own sshd, inside a private network namespace.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -q "${missing[@]}" > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q "${missing[@]}" > /dev/null; } \
    || { echo "apt-get install ${missing[*]} failed" >&2; exit 3; }
