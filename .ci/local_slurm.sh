#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for the tests marked `slurm`.
# Needs root (CI runs as root): installs the packages if missing, writes /etc/slurm/slurm.conf (partition
# `debug`, this machine's cores and memory, no accounting) unless a foreign one is there, and starts munged,
# slurmctld and slurmd where they are not running. Idempotent; exits non-zero if the node does not come up.
# Usage: bash .ci/local_slurm.sh   then sbatch, srun, squeue and `pytest -m slurm` work here.
set -euo pipefail

PACKAGES=(slurmd slurmctld slurm-client munge)
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${PACKAGES[@]}" >/dev/null
}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! [ -x /usr/sbin/munged ]; then
  apt_install 2>/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null; apt_install; }
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf=/etc/slurm/slurm.conf
marker="# one-node test cluster written by .ci/local_slurm.sh"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge

# munge: a key once, then the daemon (as root; the files it reads belong to munge).
[ -s /etc/munge/munge.key ] || mungekey --create 2>/dev/null \
  || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
munge -n >/dev/null 2>&1 || /usr/sbin/munged --force 2>/dev/null || true
for _ in $(seq 10); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
munge -n >/dev/null 2>&1 || { echo "local_slurm.sh: munged did not start" >&2; exit 1; }

# Our own config (rewritten each time, so a new host name or core count is picked up); a foreign one is kept.
if [ ! -f "$conf" ] || grep -qxF "$marker" "$conf"; then
  cat > "$conf" <<CONF
$marker
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running /run/slurmctld.pid || /usr/sbin/slurmctld -c  # -c: forget the jobs of an earlier start
for _ in $(seq 20); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
running /run/slurmd.pid || /usr/sbin/slurmd
# A node left down or drained by an earlier run of this machine comes back.
scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
for _ in $(seq 30); do
  sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)" && { sinfo -h -o "%P %a %D %t %c"; exit 0; }
  sleep 1
done
echo "local_slurm.sh: the node did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
