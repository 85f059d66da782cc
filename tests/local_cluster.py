"""A real Slurm (slurmctld + two slurmd emulating nodes n1/n2) and munge, on loopback, for tests.

Needs the tools scripts/setup_cluster_tools.sh installs; starts the daemons under a temporary
state folder and stops exactly the daemons it started (by their PID files).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from helpers import free_port

CONF = """ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/state/%n
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd-%n.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/log/jobcomp.log
MinJobAge=600
DependencyParameters=kill_invalid_depend
KillWait=10
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class Unavailable(RuntimeError):
    pass


def _run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed():
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed (scripts/setup_cluster_tools.sh installs them)")


class LocalSlurm:
    def __init__(self, state: str):
        self.state = state
        self.conf = os.path.join(state, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.pidfiles = []

    def start(self):
        ensure_installed()
        for sub in ("state", "run", "log"):
            os.makedirs(os.path.join(self.state, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(CONF.format(state=self.state, host=socket.gethostname(), ctld_port=free_port(),
                                n1_port=free_port(), n2_port=free_port()))
        self._start_munge()
        for cmd, pid in ((["slurmctld"], "slurmctld.pid"), (["slurmd", "-N", "n1"], "slurmd-n1.pid"),
                         (["slurmd", "-N", "n2"], "slurmd-n2.pid")):
            r = _run(cmd, env=self.env)
            if r.returncode != 0:
                self.stop()
                raise Unavailable(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
            self.pidfiles.append(os.path.join(self.state, "run", pid))
        deadline = time.time() + 60
        while time.time() < deadline:
            r = _run(["sinfo", "-h", "-o", "%T"], env=self.env)
            if r.returncode == 0 and r.stdout.split() and all(s.startswith("idle") for s in r.stdout.split()):
                return self
            time.sleep(0.5)
        self.stop()
        raise Unavailable(f"nodes did not become idle: {r.stdout} {r.stderr}")

    def _start_munge(self):
        if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
            return  # a munged is already running; not ours to stop
        for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        if not os.path.exists("/etc/munge/munge.key"):
            _run(["mungekey", "--create"])
        r = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if r.returncode != 0:
            raise Unavailable(f"munged failed: {r.stderr[-300:]}")
        self.pidfiles.append("/run/munge/munged.pid")

    def stop(self):
        for pidfile in reversed(self.pidfiles):
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read().strip()), 15)
            except (OSError, ValueError):
                pass
        self.pidfiles = []

    def sbatch(self, *args, cwd=None) -> str:
        r = _run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        r = _run(["scontrol", "show", "job", job_id, "-o"], env=self.env)
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    def wait(self, job_ids, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = {j: self.job(j).get("JobState") for j in job_ids}
            if all(s in until for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"jobs still running after {timeout}s: {states}")
