"""launch/slurm/finetune.sbatch on a real slurm: slurmctld and two slurmd nodes (n1, n2) on this host.

Everything the cluster needs (munge key and socket, slurm.conf, state, spool, logs) lives in one
temporary directory, on ports picked free for this run, and the daemons are stopped by the PIDs
started here. Needs root and the slurm binaries (``bash launch/setup.sh --with-slurm`` installs
them); otherwise the tests skip and say why.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, free_port, write_config

SBATCH = os.path.join(ROOT, "launch", "slurm", "finetune.sbatch")
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
NODES = ("n1", "n2")


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def tail(path: str, n: int | None = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:] if n else f.readlines())
    except OSError:
        return ""


class Cluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = self.conf

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def start(self, name: str, cmd: list[str]) -> None:
        with open(self.path("log", f"{name}.stderr"), "wb") as log:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        """The last lines each daemon logged (its log file, else what it printed)."""
        parts = []
        for name in self.procs:
            text = tail(self.path("log", f"{name}.log")) or tail(self.path("log", f"{name}.stderr"))
            if text:
                parts.append(f"--- {name}\n{text}")
        return "\n".join(parts)

    def why_down(self) -> str:
        dead = [f"{name} exited with {p.returncode}" for name, p in self.procs.items() if p.poll() is not None]
        return "; ".join(dead) or "still starting"

    def wait_for(self, what: str, ready, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs.values()):
                pytest.skip(f"slurm on this host: {what} did not come up ({self.why_down()}):\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        # Jobs first (their slurmstepd outlive slurmd), then the daemons this fixture started.
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.client("scancel", "--full", "--user", "root", timeout=10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.client("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in [*reversed(self.procs)]:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)


def slurm_conf(c: Cluster, ctld_port: int, node_ports: list[int], first_job_id: int) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
                      for n, p in zip(NODES, node_ports))
    return f"""\
ClusterName=dsaf
# launch/finetune.py derives MASTER_PORT from the job id: a parallel run's cluster numbers its own.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.path("munge", "munge.socket")}
StateSaveLocation={c.path("state")}
SlurmdSpoolDir={c.path("spool", "%n")}
SlurmctldPidFile={c.path("run", "slurmctld.pid")}
SlurmdPidFile={c.path("run", "slurmd.%n.pid")}
SlurmctldLogFile={c.path("log", "slurmctld.log")}
SlurmdLogFile={c.path("log", "slurmd.%n.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# sbatch --wait polls every 2 s only while MinJobAge / 2 <= 2 s (else 2, 8, 32 s ...)
MinJobAge=5
SlurmdParameters=config_overrides
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """A two-node slurm on 127.0.0.1 for this module; skips (saying why) where it cannot run."""
    if os.geteuid() != 0:
        pytest.skip(f"slurm on this host needs root (slurmd, munged); running as uid {os.geteuid()}")
    missing = [b for b in BINARIES if not which(b)]
    if missing:
        pytest.skip(f"slurm is not installed: {', '.join(missing)} not found "
                    "(as root: bash launch/setup.sh --with-slurm)")
    c = Cluster(tempfile.mkdtemp(prefix="dsaf-slurm-"))
    os.chmod(c.root, 0o755)  # munged wants its socket's directories traversable
    for d in ("munge", "state", "run", "log", *(os.path.join("spool", n) for n in NODES)):
        os.makedirs(c.path(d), mode=0o755)
    try:
        with open(c.path("munge", "munge.key"), "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(c.path("munge", "munge.key"), 0o400)
        sock = c.path("munge", "munge.socket")
        c.start("munged", [which("munged"), "-F", "--force", "--socket", sock, "--key-file",
                           c.path("munge", "munge.key"), "--pid-file", c.path("run", "munged.pid"),
                           "--log-file", c.path("log", "munged.log"), "--seed-file", c.path("munge", "seed")])
        c.wait_for("munged", lambda: os.path.exists(sock), timeout=15)
        cred = subprocess.run([which("munge"), "-n", "-S", sock], capture_output=True, timeout=10)
        if cred.returncode != 0:
            pytest.skip(f"slurm on this host: munge cannot make a credential: {cred.stderr.decode()[-500:]}")
        # Ports picked free now: a parallel run gets its own.
        ports = set()
        while len(ports) < 1 + len(NODES):
            ports.add(free_port())
        ctld_port, *node_ports = sorted(ports)
        with open(c.conf, "w") as f:
            f.write(slurm_conf(c, ctld_port, node_ports, random.randrange(1000, 10 ** 6)))
        c.start("slurmctld", [which("slurmctld"), "-D", "-c", "-f", c.conf])
        for n in NODES:
            c.start(f"slurmd.{n}", [which("slurmd"), "-D", "-N", n, "-f", c.conf])

        def idle() -> bool:
            out = c.client("scontrol", "-o", "show", "nodes", timeout=10).stdout
            states = [line.split("State=")[1].split()[0] for line in out.splitlines() if "State=" in line]
            return len(states) == len(NODES) and all(s.startswith("IDLE") for s in states)

        c.wait_for("two idle nodes (slurmctld + slurmd n1, n2)", idle, timeout=30)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def sbatch(c: Cluster, workdir, args: list[str], nodes: int = 2, timeout: float = 300, **env):
    """``sbatch --wait -N <nodes> launch/slurm/finetune.sbatch <args>`` from ``workdir``, as a user on
    this host would submit it (the accelerator and rendezvous address in the exported environment)."""
    job_env = {k: v for k, v in c.env.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    job_env.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
                    "DS_AUTOFREEZE_ROOT": ROOT, **env})
    job_env = {k: v for k, v in job_env.items() if v is not None}
    proc = subprocess.run([which("sbatch"), "--wait", "-N", str(nodes), "--parsable", SBATCH, *args],
                          env=job_env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    job_id = proc.stdout.strip().split(";")[0]
    assert "no longer found" not in proc.stderr, proc.stderr  # sbatch --wait missed the end: exit code unknown
    output = tail(os.path.join(workdir, f"ds_autofreeze-{job_id}.out"), n=None)
    return proc, output


def train_args(model_dir, data, config, out) -> list[str]:
    return ["--deepspeed_config", config, "--model_name_or_path", model_dir, "--train_file", data[0],
            "--validation_file", data[1], "--num_train_epochs", "2", "--max_seq_length", "16",
            "--output_dir", str(out), "--no_progress", "--trace_examples"]


def read_traces(out) -> dict[str, list[dict]]:
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in (out / "trace").iterdir()}


def test_sbatch_trains_on_two_nodes(slurm, tmp_path, tiny_model_dir, data_files):
    out = tmp_path / "out"
    # A path with a space: the arguments reach launch/finetune.py unchanged.
    config = write_config(tmp_path / "static config.json", {"decider": {"name": "static", "num_frozen_blocks": 2}})
    proc, output = sbatch(slurm, tmp_path, train_args(tiny_model_dir, data_files, config, out))
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-4000:]}\n{slurm.logs()}"
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["train_steps"] == 12  # 96 / (8 x 2 ranks) x 2 epochs
    assert output.count("summary:") == 1  # rank 0 only
    traces = read_traces(out)
    assert sorted(traces) == ["world2_rank0.jsonl", "world2_rank1.jsonl"]
    for lines in traces.values():
        assert [t["step"] for t in lines] == list(range(1, 13))
    for epoch in (0, 1):  # the two ranks split each epoch: every example once
        seen = [i for lines in traces.values() for t in lines if t["epoch"] == epoch for i in t["ids"]]
        assert len(seen) == len(set(seen)) == 96


def test_sbatch_repacks_two_workers_to_one(slurm, tmp_path, tiny_model_dir, data_files):
    """Efficiency packing: at the second freeze (step 8) one worker is cheaper; every task exits
    with 75, the batch script starts a one-task srun step with the run's new arguments."""
    af = {"decider": {"name": "schedule", "schedule": [{"fraction": 0.08, "num_frozen_blocks": 2},
                                                       {"fraction": 0.67, "num_frozen_blocks": 3}]},
          "packing": {"mode": "efficiency", "restart_seconds": 0}}
    out = tmp_path / "out"
    proc, output = sbatch(slurm, tmp_path, train_args(tiny_model_dir, data_files,
                                                      write_config(tmp_path / "pack.json", af), out))
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-4000:]}\n{slurm.logs()}"
    assert "[packing] step 8: 2 -> 1 worker(s)" in output
    assert "[slurm] released 1 node(s): the job now holds n1" in output
    assert "[slurm] re-pack: next step on 1 task(s), 1 node(s)" in output
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 1 and results["train_steps"] == 12
    assert [(r["step"], r["from_workers"], r["workers"]) for r in results["repacks"]] == [(8, 2, 1)]
    assert [h["world_size"] for h in results["epochs"]] == [2, 1]
    traces = read_traces(out)
    assert sorted(traces) == ["world1_rank0.jsonl", "world2_rank0.jsonl", "world2_rank1.jsonl"]
    trained = [t for lines in traces.values() for t in lines]
    assert sorted(t["step"] for t in trained) == sorted([*range(1, 9), *range(1, 13)])
    for epoch in (0, 1):
        seen = [i for t in trained if t["epoch"] == epoch for i in t["ids"]]
        assert len(seen) == len(set(seen)) == 96, epoch
    assert not list(tmp_path.glob(".ds_autofreeze-repack-*.json"))  # the request was consumed


FAKE_FINETUNE = """\
import json, os, sys, time
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
print(f"rank {rank}/{world} on {os.environ['SLURMD_NODENAME']}: {json.dumps(sys.argv[1:])}", flush=True)
request = {"shrink": {"workers": 1, "args": ["grow", "a b", "it's \\"q\\"", "", "--x=1 2"]},
           "grow": {"workers": 2, "args": ["never"]}}[sys.argv[1]]
if rank == 0:
    with open(os.environ["DS_AUTOFREEZE_REPACK_FILE"] + ".tmp", "w") as f:
        json.dump(request, f)
    os.replace(os.environ["DS_AUTOFREEZE_REPACK_FILE"] + ".tmp", os.environ["DS_AUTOFREEZE_REPACK_FILE"])
    time.sleep(0 if world == 1 else 30)  # ended by rank 1's exit (srun --kill-on-bad-exit=1)
else:
    time.sleep(1)
sys.exit(75)
"""


def test_sbatch_repack_loop_passes_arguments_and_releases_nodes(slurm, tmp_path):
    """The loop alone (a stand-in for launch/finetune.py): a request survives srun's 143 (the last task
    terminated by --kill-on-bad-exit), its arguments arrive verbatim, the second node is given back,
    and a request for more nodes than the job still holds fails with a message."""
    fake = tmp_path / "fake"
    (fake / "launch").mkdir(parents=True)
    (fake / "launch" / "finetune.py").write_text(FAKE_FINETUNE)
    proc, output = sbatch(slurm, tmp_path, ["shrink"], DS_AUTOFREEZE_ROOT=str(fake))
    assert proc.returncode == 1, output
    assert 'rank 0/2 on n1: ["shrink"]' in output and 'rank 1/2 on n2: ["shrink"]' in output
    assert "[slurm] srun exited with 143 after the re-pack request; continuing" in output
    assert "[slurm] released 1 node(s): the job now holds n1" in output
    assert 'rank 0/1 on n1: ["grow", "a b", "it\'s \\"q\\"", "", "--x=1 2"]' in output
    assert ("error: the re-packed run needs 2 task(s) on 2 node(s), the job holds 1 node(s) of 1 task(s) "
            "(it released 1; DS_AUTOFREEZE_RELEASE_NODES=0 keeps them)") in output
    assert "never" not in output


def test_sbatch_without_the_repository_says_where_it_looked(slurm, tmp_path):
    proc, output = sbatch(slurm, tmp_path, ["--deepspeed_config", "x.json"], nodes=1, DS_AUTOFREEZE_ROOT=None)
    assert proc.returncode == 2
    assert f"error: {tmp_path}/launch/finetune.py not found" in output
