#!/usr/bin/env bash
# Bring up / tear down a throw-away single-node Slurm cluster (slurmctld + slurmd + munged) for the
# tests, as root, without systemd. Everything lives in one state folder:
#   FAIRBENCH_SLURM_DIR (default /tmp/fairbench-slurm)
#
#   .ci/slurm.sh up     # installs slurm-wlm + munge if missing, starts daemons, writes <state>/env.sh
#   .ci/slurm.sh down   # stops the daemons and removes the state folder
#
# Tests read SLURM_CONF from <state>/env.sh; when the cluster cannot be provided at all (not root,
# no apt-get) `up` says why on one line and exits 0 without writing env.sh, so those tests skip.
# If the packages are there but the daemons fail to come up, `up` prints the logs and exits 1.
set -euo pipefail

STATE="${FAIRBENCH_SLURM_DIR:-/tmp/fairbench-slurm}"
CTLD_PORT="${FAIRBENCH_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${FAIRBENCH_SLURM_SLURMD_PORT:-16818}"
CONF="$STATE/slurm.conf"
ENV_FILE="$STATE/env.sh"
MUNGE_KEY="$STATE/munge/munge.key"
MUNGE_SOCK="$STATE/munge/munge.socket"
MUNGE_PID="$STATE/munge/munged.pid"
CTLD_PID="$STATE/slurmctld.pid"
SLURMD_PID="$STATE/slurmd.pid"
export PATH="$PATH:/usr/sbin:/sbin"

short_host() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }
log() { echo "[slurm.sh] $*"; }

pid_alive() {  # pid_alive PIDFILE
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemons() {  # stop_daemons NAME:PIDFILE ...  (SIGTERM all at once, SIGKILL after 10 s)
    local spec name pidfile pid i alive
    local -a names=() pids=()
    for spec in "$@"; do
        name=${spec%%:*}; pidfile=${spec#*:}
        [[ -s "$pidfile" ]] || continue
        pid=$(cat "$pidfile"); rm -f "$pidfile"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            names+=("$name"); pids+=("$pid")
        fi
    done
    (( ${#pids[@]} )) || return 0
    for i in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then kill -9 "${pids[$i]}" 2>/dev/null || true; fi
        log "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}

cmd_down() {
    # cancel leftover jobs first: their slurmstepd/job processes outlive a killed slurmd
    if [[ -f "$CONF" ]] && pid_alive "$CTLD_PID" && command -v squeue >/dev/null; then
        local jobs i
        jobs=$(SLURM_CONF="$CONF" timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || jobs=""
        if [[ -n "${jobs// /}" ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            for i in $(seq 40); do
                [[ -z "$(SLURM_CONF="$CONF" squeue -h -t R,CG,S -o %A 2>/dev/null)" ]] && break
                sleep 0.25
            done
            log "cancelled leftover jobs: $jobs"
        fi
    fi
    stop_daemons "slurmd:$SLURMD_PID" "slurmctld:$CTLD_PID" "munged:$MUNGE_PID"
    rm -rf "$STATE"
    log "down (removed $STATE)"
}

cluster_ready() {  # node idle/mixed/alloc and the controller answers
    SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}

dump_logs() {
    local f
    for f in "$STATE/munge/munged.log" "$STATE/slurmctld.log" "$STATE/slurmd.log"; do
        [[ -f "$f" ]] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

fail_up() {
    echo "[slurm.sh] ERROR: $*" >&2
    dump_logs
    cmd_down >&2 || true
    exit 1
}

ensure_packages() {  # returns 1 (after printing the reason) when slurm cannot be provided
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "[slurm.sh] skipping: slurm not installed and not root (cannot apt-get install)"; return 1
    fi
    if ! command -v apt-get >/dev/null; then
        echo "[slurm.sh] skipping: slurm not installed and apt-get not available"; return 1
    fi
    log "installing slurm-wlm + munge with apt-get ..."
    mkdir -p "$STATE"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >"$STATE/apt.log" 2>&1; then
        tail -n 20 "$STATE/apt.log" >&2 || true
        echo "[slurm.sh] skipping: apt-get install slurm-wlm munge failed (see $STATE/apt.log)"
        return 1
    fi
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || { echo "[slurm.sh] skipping: slurm binaries still missing after install"; return 1; }
}

write_config() {
    local host cpus avail_mb mem_mb
    host=$(short_host)
    cpus=$(nproc)
    avail_mb=$(awk '/^MemAvailable:/ {print int($2/1024)}' /proc/meminfo)
    mem_mb=$(( avail_mb * 9 / 10 ))
    (( mem_mb >= 256 )) || mem_mb=256

    # Fake GPUs: slurm requires character devices (plain files are rejected); c 1 3 == /dev/null.
    mkdir -p "$STATE/dev"
    local i
    for i in 0 1; do
        if ! mknod "$STATE/dev/gpu$i" c 1 3 2>/dev/null; then
            ln -sf /dev/null "$STATE/dev/gpu$i"   # fallback where mknod is not permitted
        fi
    done

    cat >"$STATE/gres.conf" <<EOF
NodeName=$host Name=gpu File=$STATE/dev/gpu0
NodeName=$host Name=gpu File=$STATE/dev/gpu1
EOF

    cat >"$CONF" <<EOF
# generated by .ci/slurm.sh -- throw-away single-node test cluster
ClusterName=fairbench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# finished-job records for the sacct stand-in ($STATE/bin/sacct): there is no slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
GresTypes=gpu
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
TmpFS=$STATE/tmp
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    mkdir -p "$STATE/munge"
    chmod 700 "$STATE/munge"
    mungekey --create --force --keyfile "$MUNGE_KEY" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    chmod 600 "$MUNGE_KEY"
    munged --force --key-file "$MUNGE_KEY" --socket "$MUNGE_SOCK" --pid-file "$MUNGE_PID" \
        --log-file "$STATE/munge/munged.log" --seed-file "$STATE/munge/munged.seed" \
        >"$STATE/munge/munged.out" 2>&1 || { cat "$STATE/munge/munged.out" >&2; fail_up "munged failed to start"; }
    local i
    for i in $(seq 50); do [[ -S "$MUNGE_SOCK" ]] && break; sleep 0.1; done
    [[ -S "$MUNGE_SOCK" ]] || fail_up "munge socket $MUNGE_SOCK did not appear"
    if command -v munge >/dev/null && command -v unmunge >/dev/null; then
        munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 || fail_up "munge self-test failed"
    fi
}

write_sacct_shim() {
    cat >"$STATE/bin/sacct" <<'SHIM'
#!/usr/bin/env bash
# sacct stand-in for the fairbench test cluster (AccountingStorageType=none, no slurmdbd).
# Supports what submitit and simple tests use: -o/--format FIELDS, -j/--jobs IDS, -n, -P/--parsable2
# (output is always '|'-separated). Live jobs come from squeue, purged ones from the jobcomp log.
set -uo pipefail
fields="JobID,JobName,Partition,State,ExitCode,NodeList"; ids=""; header=1
while (($#)); do
    case "$1" in
        -o|--format|--fields) fields=$2; shift ;;
        --format=*|--fields=*) fields=${1#*=} ;;
        -o?*) fields=${1#-o} ;;
        -j|--jobs) ids="$ids,$2"; shift ;;
        --jobs=*) ids="$ids,${1#*=}" ;;
        -j?*) ids="$ids,${1#-j}" ;;
        -n|--noheader) header=0 ;;
        *) ;;
    esac
    shift
done
here=$(cd "$(dirname "$0")/.." && pwd)
{
    squeue -h -r -t all -o 'LIVE|%i|%A|%T|%N|%j|%P' 2>/dev/null
    echo "LOGSTART"
    cat "$here/jobcomp.log" 2>/dev/null
} | awk -v fields="$fields" -v ids="$ids" -v header="$header" '
function kv(line, key,   m) {
    if (match(line, "(^| )" key "=[^ ]*")) { m = substr(line, RSTART, RLENGTH); sub(/^ /, "", m); return substr(m, length(key) + 2) }
    return ""
}
function wanted(id, raw,   n, a, i) {
    if (ids == "") return 1
    n = split(ids, a, ",")
    for (i = 1; i <= n; i++) if (a[i] != "" && (id == a[i] || raw == a[i] || index(id, a[i] "_") == 1)) return 1
    return 0
}
BEGIN { FS = "|"; nf = split(fields, F, ","); inlog = 0; n = 0 }
$0 == "LOGSTART" { inlog = 1; FS = "\n"; next }
!inlog && $1 == "LIVE" {
    id = $2; if (!wanted(id, $3)) next
    if (!(id in seen)) { order[++n] = id; seen[id] = 1 }
    live[id] = ($4 ~ /^(PENDING|RUNNING|COMPLETING|CONFIGURING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|SUSPENDED|STOPPED|SIGNALING|STAGE_OUT)$/); raw[id] = $3; st[id] = $4; nodes[id] = ($5 == "(null)" ? "" : $5); name[id] = $6; part[id] = $7; ec[id] = ""
    next
}
inlog {
    r = kv($0, "JobId"); if (r == "") next
    aj = kv($0, "ArrayJobId"); at = kv($0, "ArrayTaskId")
    id = (aj != "" && aj != "0" && at != "" && at != "4294967294" && at != "4294967295") ? aj "_" at : r
    if (!wanted(id, r) || live[id]) next  # still active: squeue state wins; finished: the record has ExitCode
    if (!(id in seen)) { order[++n] = id; seen[id] = 1 }
    raw[id] = r; st[id] = kv($0, "JobState"); nodes[id] = kv($0, "NodeList"); name[id] = kv($0, "Name")
    part[id] = kv($0, "Partition"); ec[id] = kv($0, "ExitCode")
}
END {
    if (header) { line = ""; for (i = 1; i <= nf; i++) line = line (i > 1 ? "|" : "") F[i]; print line }
    for (j = 1; j <= n; j++) {
        id = order[j]; line = ""
        for (i = 1; i <= nf; i++) {
            f = tolower(F[i]); v = ""
            if (f == "jobid") v = id; else if (f == "jobidraw") v = raw[id]; else if (f == "state") v = st[id]
            else if (f == "nodelist") v = nodes[id]; else if (f == "jobname") v = name[id]
            else if (f == "partition") v = part[id]; else if (f == "exitcode") v = ec[id]
            line = line (i > 1 ? "|" : "") v
        }
        print line
    }
}'
SHIM
    chmod +x "$STATE/bin/sacct"
}

cmd_up() {
    if [[ -f "$ENV_FILE" ]] && pid_alive "$MUNGE_PID" && pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" \
        && cluster_ready; then
        log "already up; ready"
        echo "$ENV_FILE"
        return 0
    fi
    ensure_packages || exit 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "[slurm.sh] skipping: starting the test cluster needs root"; exit 0
    fi
    # start from scratch (also clears a half-started or stale state folder)
    cmd_down >/dev/null 2>&1 || true

    local t0=$SECONDS
    mkdir -p "$STATE"/{ctld,spool/"slurmd-$(short_host)",tmp,bin}
    write_sacct_shim
    write_config
    start_munged

    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF" >"$STATE/slurmctld.out" 2>&1 || { cat "$STATE/slurmctld.out" >&2; fail_up "slurmctld failed to start"; }
    slurmd -f "$CONF" >"$STATE/slurmd.out" 2>&1 || { cat "$STATE/slurmd.out" >&2; fail_up "slurmd failed to start"; }

    local i
    for i in $(seq 60); do cluster_ready && break; sleep 0.5; done
    cluster_ready || { sinfo -N -l >&2 || true; fail_up "node did not become idle within 30 s"; }

    # smoke test: one real batch job end to end
    local out="$STATE/tmp/smoke.out"
    timeout 60 sbatch --quiet --wait --output="$out" --wrap 'hostname' >/dev/null 2>"$STATE/smoke.err" \
        || { cat "$STATE/smoke.err" >&2; fail_up "smoke-test job failed"; }
    [[ -s "$out" ]] || fail_up "smoke-test job produced no output"

    cat >"$ENV_FILE" <<EOF
# source me: clients (sbatch, squeue, scontrol, submitit) need SLURM_CONF
export SLURM_CONF=$CONF
export FAIRBENCH_SLURM_DIR=$STATE
# sacct stand-in (live jobs from squeue, finished ones from the jobcomp log) so that e.g. submitit
# sees real states (COMPLETED/FAILED/CANCELLED) instead of UNKNOWN without slurmdbd
export PATH=$STATE/bin:\$PATH
EOF
    log "ready in $((SECONDS - t0)) s (node $(short_host), $(nproc) CPUs, gpu:2, partition debug)"
    echo "$ENV_FILE"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    *) echo "usage: $0 up|down   (state folder: $STATE)" >&2; exit 2 ;;
esac
