#!/usr/bin/env bash
# The real `ray up` -> `ray job submit` -> `ray down` cycle against this machine, over SSH.
#
# Usage: ray_up_cycle.sh WORKDIR CLUSTER_YAML -- JOB COMMAND...
#   Run from the repository root (the job's --working-dir), as root, with the project's venv bin on PATH.
#
# Everything runs in private namespaces so nothing here can touch another Ray on the machine:
#   - PID namespace: `ray stop` / `ray down` only see the processes started in here;
#   - network namespace: a loopback of our own, so sshd can listen on 127.0.0.1:22 (what `ray up` dials;
#     the launcher has no SSH port option) and Ray's ports (6379, 8265, ...) cannot collide with anyone's;
#   - mount namespace: /root (the SSH user's home: authorized_keys, the Ray token, the bootstrap files
#     `ray up` uploads) becomes an overlay whose writes land in a tmpfs, and /tmp/ray (Ray's session dirs,
#     the local provider's state) a fresh directory; the real ones are never written.
# When this script ends, the namespace's PID 1 ends and the kernel kills whatever is left inside.
set -euo pipefail

if [[ "${1:-}" != "--inside" ]]; then
    WORK=$(realpath "$1"); shift
    # --kill-child: if this script is killed (a test timeout), the namespace and all in it go too.
    exec unshare --pid --fork --kill-child --net --mount --mount-proc bash "$(realpath "$0")" --inside "$WORK" "$@"
fi
shift
WORK=$1; CLUSTER_YAML=$2; shift 2
[[ "${1:-}" == "--" ]] && shift
VENV_BIN=$(dirname "$(command -v ray)")
step() { printf '\n=== %s\n' "$*"; }

step "private loopback, home and Ray temp dir"
ip link set lo up
mkdir -p "$WORK/overlay" "$WORK/tmp-ray" /tmp/ray /run/sshd
mount -t tmpfs tmpfs "$WORK/overlay"
mkdir -p "$WORK/overlay/upper" "$WORK/overlay/work"
mount -t overlay overlay -o "lowerdir=/root,upperdir=$WORK/overlay/upper,workdir=$WORK/overlay/work" /root
mount --bind "$WORK/tmp-ray" /tmp/ray
# The launcher also writes a config cache under $TMPDIR and SSH control sockets under a fixed
# /tmp/ray_ssh_<sha256(user)[:10]>: keep both private too.
mkdir -p "$WORK/tmp" "$WORK/ray_ssh"
export TMPDIR="$WORK/tmp"
SSH_CONTROL_DIR="/tmp/ray_ssh_$(printf %s "$(id -un)" | sha256sum | cut -c1-10)"
mkdir -p "$SSH_CONTROL_DIR"
mount --bind "$WORK/ray_ssh" "$SSH_CONTROL_DIR"
export HOME=/root
unset RAY_ADDRESS RAY_AUTH_MODE
# `ray up` runs its remote commands in `bash --login -i`, which reads ~/.bashrc: that is how the head finds
# ray and raylstm (this project's venv), as it would on a machine where they are installed.
echo "export PATH=$VENV_BIN:\$PATH" >> /root/.bashrc

step "sshd on 127.0.0.1:22 with a host key and a client key made for this run"
mkdir -p /root/.ssh && chmod 700 /root/.ssh
ssh-keygen -q -t ed25519 -N '' -C raylstm-test-host -f "$WORK/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C raylstm-test-client -f /root/.ssh/id_ed25519
cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $WORK/ssh_host_ed25519_key
PidFile $WORK/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile /root/.ssh/authorized_keys
# Ray's ssh calls multiplex over one ControlMaster connection and hold it open.
MaxSessions 50
MaxStartups 50
EOF
/usr/sbin/sshd -f "$WORK/sshd_config" -E "$WORK/sshd.log"
# sshd forks into the background before it binds its socket: wait until it accepts connections.
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && break; sleep 0.1; done
ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
    root@127.0.0.1 'echo "ssh ok: $(whoami)@$(hostname) PATH has ray: $(command -v ray)"'

step "ray get-auth-token --generate   (the token every node and client shares)"
ray get-auth-token --generate > /dev/null

cleanup() {
    rc=$?
    step "cleanup (exit $rc)"
    ray down -y "$CLUSTER_YAML" > "$WORK/ray_down_cleanup.log" 2>&1 || true
    [[ -f "$WORK/sshd.pid" ]] && kill "$(cat "$WORK/sshd.pid")" 2>/dev/null || true
    exit $rc
}
trap cleanup EXIT

step "ray up -y $CLUSTER_YAML"
ray up -y --no-config-cache "$CLUSTER_YAML" 2>&1 | tee "$WORK/ray_up.log" | tail -n 25

step "ray status"
RAY_AUTH_MODE=token ray status --address 127.0.0.1:6379 2>&1 | tee "$WORK/ray_status.log" | tail -n 25

step "token authentication is enforced: the dashboard refuses a client without the token"
python - <<'PY'
import urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=30)
    raise SystemExit("dashboard answered without a token: token auth is NOT on")
except urllib.error.HTTPError as e:
    print(f"no token -> HTTP {e.code}")
    assert e.code in (401, 403), e.code
PY

step "ray job submit --working-dir . -- $*"
export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265
ray job submit --working-dir . -- "$@" 2>&1 | tee "$WORK/job.log" | tail -n 25
# `ray job submit` waits for the job and exits non-zero when it fails; say so in the log too.
grep -q "succeeded" "$WORK/job.log"
unset RAY_ADDRESS RAY_AUTH_MODE

trap - EXIT
step "ray down -y $CLUSTER_YAML"
ray down -y "$CLUSTER_YAML" 2>&1 | tee "$WORK/ray_down.log" | tail -n 15
step "after ray down: Ray processes left in this namespace"
pgrep -a -f "raylet|gcs_server" || echo "none"
kill "$(cat "$WORK/sshd.pid")"
