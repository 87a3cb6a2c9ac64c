"""The SLURM environment, read once: ranks, world size, the rendezvous address, the job and its requeues.

`slurm_env()` reads the SLURM_* variables that `srun` sets for each task (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS, SLURM_NODEID, SLURM_JOB_NUM_NODES, SLURM_JOB_NODELIST, SLURM_JOB_ID, SLURM_RESTART_COUNT).
The ranks describe the SLURM *task* layout: with one task per GPU (the Hydra submitit launcher,
configs/hydra/launcher/slurm*.yaml) they are the torch.distributed ranks; with one task per node that runs
`accelerate launch` (slurm/*.sbatch) the launcher makes the per-GPU ranks itself.

`export_torch_env()` turns them into the variables torch.distributed's env:// rendezvous and Accelerate
read (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE). `SlurmEnvCallback` does it
at the start of every Hydra job, before the trainer builds its Accelerator; the launcher configs enable it.

`python -m llmopt.slurm` prints MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK and REQUEUE_COUNT as shell
`export` lines, for the sbatch templates in slurm/.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping

from hydra.experimental.callback import Callback

MIN_PORT, PORT_RANGE = 20000, 20000   # derived master ports lie in [20000, 40000)

# torch.distributed / Accelerate variable <- slurm_env() key
TORCH_VARS = {"MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port", "RANK": "rank",
              "LOCAL_RANK": "local_rank", "WORLD_SIZE": "world_size", "LOCAL_WORLD_SIZE": "local_world_size"}


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names: "gpu[01-03,07],cpu1" -> gpu01 gpu02 gpu03 gpu07 cpu1.

    Zero padding is kept ("[008-010]" -> 008 009 010); several bracket groups in one name multiply out.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_name(name))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM host list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM host list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_name(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, suffix = name[:match.start()], name[match.end():]
    hosts = []
    for item in match.group(1).split(","):
        if "-" in item:
            low, high = item.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
                raise ValueError(f"bad range {item!r} in SLURM host name {name!r}")
            values = [str(v).zfill(len(low)) for v in range(int(low), int(high) + 1)]
        else:
            values = [item]
        for value in values:   # later bracket groups of the same name expand recursively
            hosts.extend(_expand_name(prefix + value + suffix))
    return hosts


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """SLURM_TASKS_PER_NODE is e.g. "4", "4(x2)" or "4(x2),2": the first entry is this job's first nodes."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not raw:
        return None
    match = re.match(r"(\d+)", raw)
    return int(match.group(1)) if match else None


def slurm_env(environ: Mapping[str, str] | None = None) -> dict:
    """The SLURM task layout of this process.

    Keys: in_slurm, rank, local_rank, world_size, local_world_size, node_rank, num_nodes, master_addr,
    master_port, job_id, array_job_id, array_task_id, requeue_count, hosts.
    Outside SLURM (no SLURM_JOB_ID) it describes a single process on this machine (in_slurm False).
    master_port: MASTER_PORT if set, else 20000 + job_id mod 20000, the same on every node of the job and
    different for jobs that share a node. requeue_count: SLURM_RESTART_COUNT (0 on the first start).
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return {"in_slurm": False, "rank": 0, "local_rank": 0, "world_size": 1, "local_world_size": 1,
                "node_rank": 0, "num_nodes": 1, "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                "master_port": _int(env, "MASTER_PORT", default=29500), "job_id": None, "array_job_id": None,
                "array_task_id": None, "requeue_count": 0, "hosts": []}
    hostlist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = expand_hostlist(hostlist) if hostlist else []
    num_nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=max(1, len(hosts)))
    world_size = _int(env, "SLURM_NTASKS", "SLURM_NPROCS", default=num_nodes)
    per_node = _tasks_on_this_node(env) or max(1, world_size // num_nodes)
    rank = _int(env, "SLURM_PROCID", default=0)
    if not 0 <= rank < world_size:
        raise ValueError(f"SLURM_PROCID={rank} is outside [0, SLURM_NTASKS={world_size})")
    master_port = _int(env, "MASTER_PORT")
    if master_port is None:
        master_port = MIN_PORT + int(re.sub(r"\D", "", job_id) or 0) % PORT_RANGE
    return {
        "in_slurm": True,
        "rank": rank,
        "local_rank": _int(env, "SLURM_LOCALID", default=0),
        "world_size": world_size,
        "local_world_size": per_node,
        "node_rank": _int(env, "SLURM_NODEID", default=0),
        "num_nodes": num_nodes,
        "master_addr": env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        "master_port": master_port,
        "job_id": job_id,
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": _int(env, "SLURM_ARRAY_TASK_ID"),
        "requeue_count": _int(env, "SLURM_RESTART_COUNT", default=0),
        "hosts": hosts,
    }


def torch_env(info: dict) -> dict[str, str]:
    """The env:// rendezvous variables of a slurm_env() result."""
    return {var: str(info[key]) for var, key in TORCH_VARS.items()}


def export_torch_env(environ: dict | None = None) -> dict[str, str]:
    """Set MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE from SLURM.

    Only inside a SLURM job with more than one task, and only where the variable is not already set (a
    launcher such as torchrun or `accelerate launch` inside the job has set them for its own workers).
    Returns what was set.
    """
    env = os.environ if environ is None else environ
    info = slurm_env(env)
    if not info["in_slurm"] or info["world_size"] < 2:
        return {}
    if "RANK" in env or "LOCAL_RANK" in env:   # a per-GPU launcher already owns the ranks
        return {}
    values = {k: v for k, v in torch_env(info).items() if k not in env}
    env.update(values)
    return values


class SlurmEnvCallback(Callback):
    """Hydra callback: export the torch.distributed variables from SLURM before each job runs."""

    def on_job_start(self, config, **kwargs) -> None:
        export_torch_env()


def main() -> int:
    """Print the rendezvous of this SLURM job as shell exports (`eval "$(python -m llmopt.slurm)"`)."""
    info = slurm_env()
    exports = {"MASTER_ADDR": info["master_addr"], "MASTER_PORT": info["master_port"],
               "NNODES": info["num_nodes"], "NODE_RANK": info["node_rank"],
               "REQUEUE_COUNT": info["requeue_count"]}
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
