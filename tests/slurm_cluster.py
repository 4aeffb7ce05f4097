"""A real single-machine SLURM cluster (Debian's slurm-wlm) with two nodes, for launcher tests.

slurmctld plus two ``slurmd -N n1`` / ``-N n2`` daemons on 127.0.0.1 with their own ports; no munge
(``auth/none``), no cgroups (``proctrack/linuxproc``, ``task/none``), state in a temporary folder.
"""
import os
import random
import shutil
import socket
import subprocess
import time

_TAKEN = set()


def free_port() -> int:
    """A port below the ephemeral range (its ports are handed to outgoing connections, which can take one
    between the choice and the daemon's bind), bindable on every address, never handed out twice."""
    while True:
        port = random.randint(20000, 30000)
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_binaries():
    return [b for b in BINARIES if shutil.which(b) is None]


class SlurmCluster:
    def __init__(self, root, nodes=("n1", "n2"), cpus=2):
        self.root, self.nodes = str(root), nodes
        host = socket.gethostname().split(".")[0]
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        lines = [
            "ClusterName=sdstest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
            "AuthType=auth/none", "CredType=cred/none", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none", "SwitchType=switch/none",
            "MpiDefault=none", "SlurmUser=root", "SlurmdUser=root", "ReturnToService=2",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "InactiveLimit=0", "KillWait=5", "MinJobAge=300",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
        ]
        for n in nodes:
            lines.append(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={free_port()} "
                         f"CPUs={cpus} RealMemory=8000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE")
        self.conf = os.path.join(self.root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = []

    def start(self, timeout=60):
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        time.sleep(1)
        for n in self.nodes:
            os.makedirs(os.path.join(self.root, f"spool-{n}"), exist_ok=True)
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", n], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                                 text=True).stdout
            states = dict(line.split() for line in out.strip().splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s.startswith("idle") for s in states.values()):
                return self
            time.sleep(0.5)
        self.stop()  # no daemons left behind
        raise RuntimeError(f"SLURM nodes did not come up: {out!r}; see {self.root}/*.log")

    def sbatch(self, args, cwd, env=None):
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=dict(self.env, **(env or {})),
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def wait(self, job, timeout=600):
        """Poll squeue (faster than sbatch --wait), then return the job's final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=self.env, capture_output=True,
                               text=True)
            if not q.stdout.strip():
                break
            time.sleep(0.5)
        info = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True,
                              text=True).stdout
        for field in info.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
