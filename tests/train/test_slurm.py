"""SLURM without a cluster: the environment parsing, the launcher's sbatch file, the sbatch templates.

The Hydra submitit launcher runs for real, with `sbatch` and `srun` replaced by scripts on PATH that
record what they are given; the generated sbatch file and the templates in slurm/ are then executed
with fake `srun`, `scontrol`, `scancel` and `accelerate`.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import OmegaConf

from llmopt.slurm import SlurmEnvCallback, expand_hostlist, export_torch_env, slurm_env

ROOT = Path(__file__).resolve().parents[2]

# the variables srun sets in task 5 of a 2-node x 4-GPU job (one task per GPU), requeued twice
TASK_ENV = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_RESTART_COUNT": "2"}


# -- environment parsing ---------------------------------------------------------------------------------------


def test_slurm_env_of_a_task():
    info = slurm_env(TASK_ENV)
    assert info["in_slurm"] is True
    assert (info["rank"], info["local_rank"], info["world_size"], info["local_world_size"]) == (5, 1, 8, 4)
    assert (info["node_rank"], info["num_nodes"]) == (1, 2)
    assert info["master_addr"] == "gpu-a07" and info["hosts"] == ["gpu-a07", "gpu-a08"]
    assert info["master_port"] == 20000 + 123456 % 20000
    assert info["job_id"] == "123456" and info["requeue_count"] == 2 and info["array_task_id"] is None


def test_slurm_env_overrides_and_arrays():
    env = {**TASK_ENV, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "SLURM_ARRAY_JOB_ID": "123450",
           "SLURM_ARRAY_TASK_ID": "6", "SLURM_RESTART_COUNT": ""}
    info = slurm_env(env)
    assert (info["master_addr"], info["master_port"]) == ("10.0.0.1", 29400)
    assert (info["array_job_id"], info["array_task_id"], info["requeue_count"]) == ("123450", 6, 0)
    # older SLURM names, one node, one task
    info = slurm_env({"SLURM_JOBID": "77", "SLURM_NODELIST": "node001", "SLURM_NNODES": "1", "SLURM_NPROCS": "1"})
    assert (info["rank"], info["world_size"], info["master_addr"], info["master_port"]) == (0, 1, "node001", 20077)


def test_slurm_env_outside_slurm_is_one_local_process():
    info = slurm_env({})
    assert info["in_slurm"] is False and info["job_id"] is None
    assert (info["rank"], info["world_size"], info["num_nodes"], info["master_addr"]) == (0, 1, 1, "127.0.0.1")


def test_slurm_env_refuses_an_inconsistent_rank():
    with pytest.raises(ValueError, match="SLURM_PROCID=8"):
        slurm_env({**TASK_ENV, "SLURM_PROCID": "8"})


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],cpu1", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_refuses_malformed_lists(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_export_torch_env_sets_the_rendezvous_once():
    env = dict(TASK_ENV)
    exported = export_torch_env(env)
    assert exported == {"MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(20000 + 123456 % 20000), "RANK": "5",
                        "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert env["RANK"] == "5"
    assert export_torch_env(env) == {}                                  # a launcher's ranks are kept
    assert export_torch_env({**TASK_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}  # one task
    assert export_torch_env({}) == {}                                   # not in SLURM


def test_callback_exports_before_the_job(monkeypatch):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        environ.pop(key, None)
    monkeypatch.setattr(os, "environ", {**environ, **TASK_ENV})     # a copy: nothing leaks into other tests
    SlurmEnvCallback().on_job_start(config=OmegaConf.create(), task_function=None)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert os.environ["MASTER_ADDR"] == "gpu-a07"


def test_module_prints_shell_exports():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}, **TASK_ENV}
    out = subprocess.run([sys.executable, "-m", "llmopt.slurm"], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.splitlines() == ["export MASTER_ADDR=gpu-a07", f"export MASTER_PORT={20000 + 123456 % 20000}",
                                "export NNODES=2", "export NODE_RANK=1", "export REQUEUE_COUNT=2"]


# -- fake SLURM commands ------------------------------------------------------------------------------------


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin directory on PATH with recording sbatch, srun, scontrol, scancel and accelerate."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    python = shlex.quote(sys.executable)
    # sbatch keeps the file it is given and answers as SLURM does
    _script(bin_dir / "sbatch", '#!/bin/bash\ncp "$1" "$FAKE_LOG/sbatch.sh"\necho "Submitted batch job 4242"\n')
    # srun drops its options and runs the command once per node, with that node's SLURM_NODEID
    _script(bin_dir / "srun", """#!/bin/bash
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do
    case "$1" in --output|--error) shift 2 ;; *) shift ;; esac
done
if [ -n "${FAKE_SRUN_EXIT:-}" ]; then exit "$FAKE_SRUN_EXIT"; fi
status=0
for ((node = 0; node < ${SLURM_JOB_NUM_NODES:-1}; node++)); do
    SLURM_NODEID=$node "$@" || status=$?
done
exit $status
""")
    for name in ("scontrol", "scancel"):
        _script(bin_dir / name, f'#!/bin/bash\necho "$*" >> "$FAKE_LOG/{name}.log"\n'
                                f'if [ "{name}" = scancel ]; then touch "$FAKE_LOG/signalled"; fi\n')
    # accelerate records its arguments (one JSON list per call); FAKE_WAIT_SIGNAL: wait for scancel first
    _script(bin_dir / "accelerate", f"""#!{python}
import json, os, pathlib, sys, time
log = pathlib.Path(os.environ["FAKE_LOG"])
with open(log / "accelerate.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_WAIT_SIGNAL"):
    deadline = time.time() + 20
    while not (log / "signalled").exists() and time.time() < deadline:
        time.sleep(0.05)
    run_dir = pathlib.Path(os.environ["FAKE_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({{"step": 10, "preempted": True}}, indent=2))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- the Hydra submitit launcher (configs/hydra/launcher) --------------------------------------------------------


def _launch(launcher: str, hydra_overrides: list[str], task_overrides: list[str]):
    """Compose and launch a multirun as `python -m llmopt.train -m` would, up to (and including) sbatch.

    The jobs are the basic sweeper's expansion of `task_overrides`; returns the composed master config.
    """
    from submitit.slurm.slurm import SlurmJob

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]   # the master config leaves sweeps out
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", *hydra_overrides, *fixed],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
        instance = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=lambda c: None,
                                                           config=cfg)
        with mock.patch.object(SlurmJob, "results", lambda self: [None]):   # do not wait for the jobs
            assert instance.launch(jobs, initial_job_idx=0) == [None] * len(jobs)
    return cfg


def _sbatch_flags(text: str) -> dict[str, str]:
    flags = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_launcher_writes_an_array_job_with_one_task_per_gpu(tmp_path, fake_slurm):
    sweep = tmp_path / "sweep"
    _launch("slurm", [f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                      "hydra.launcher.gpus_per_node=4"], ["experiment=scale_table/scale_60m", "seed=42,43,44"])
    text = (fake_slurm / "sbatch.sh").read_text()
    flags = _sbatch_flags(text)
    assert flags["partition"] == "gpu" and flags["account"] == "proj"
    assert flags["nodes"] == "1" and flags["gpus-per-node"] == "4" and flags["ntasks-per-node"] == "4"
    assert flags["array"] == "0-2%3"                      # one SLURM job per run of the sweep
    assert flags["time"] == "1440" and flags["cpus-per-task"] == "8" and flags["job-name"] == "llmopt"
    assert flags["signal"] == "USR1@180" and "requeue" in flags
    assert f"{sweep}/.submitit/%A_%a/" in flags["output"]
    assert "srun --unbuffered" in text and "-m submitit.core._submit" in text
    # every job's pickle is in its own folder (SLURM array task ids 4242_0, 4242_1, 4242_2)
    assert sorted(p.name for p in (sweep / ".submitit").glob("4242_*/*_submitted.pkl")) == [
        "4242_0_submitted.pkl", "4242_1_submitted.pkl", "4242_2_submitted.pkl"]


def test_launcher_multinode(tmp_path, fake_slurm):
    _launch("slurm_multinode", [f"hydra.sweep.dir={tmp_path}", "hydra.launcher.nodes=4"],
            ["experiment=scale_table/scale_7b"])
    flags = _sbatch_flags((fake_slurm / "sbatch.sh").read_text())
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("4", "8", "8")
    assert flags["time"] == "2880" and "array" not in flags


def test_local_launcher_config_instantiates():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True)
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=GlobalHydra.instance().config_loader(),
                                       callbacks=Callbacks(cfg)), task_function=lambda c: None, config=cfg)
    assert type(launcher).__name__ == "LocalLauncher"
    assert (launcher.params["gpus_per_node"], launcher.params["tasks_per_node"]) == (1, 1)


@pytest.mark.parametrize("exit_code, restarts, requeued", [(75, "0", True), (75, "20", False), (0, "0", False),
                                                          (1, "0", False)])
def test_launcher_sbatch_requeues_a_run_stopped_at_a_checkpoint(tmp_path, fake_slurm, exit_code, restarts,
                                                                requeued):
    """Run the generated sbatch file: srun (the training tasks) exits with `exit_code`."""
    _launch("slurm", [f"hydra.sweep.dir={tmp_path}"], ["experiment=scale_table/scale_60m"])
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": restarts,
           "FAKE_SRUN_EXIT": str(exit_code)}
    done = subprocess.run(["bash", str(fake_slurm / "sbatch.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == exit_code
    assert _lines(fake_slurm / "scontrol.log") == (["requeue 4242"] if requeued else [])


def test_launcher_job_keeps_its_run_directory_on_requeue(tmp_path, fake_slurm):
    """A requeued job unpickles the same launcher: the sweep directory (with its ${now:...}) stays."""
    from submitit.core.utils import DelayedSubmission

    root = tmp_path / "outputs"
    cfg = _launch("slurm", [], [f"output_root={root}", "experiment=sgd_ll_table/sgd_ll_130m", "seed=43"])
    sweep_dir = Path(cfg.hydra.sweep.dir)                 # ${now:...}, resolved when the sweep was launched
    assert (sweep_dir / ".submitit").is_dir() and sweep_dir.parent.parent == root / "multirun"
    time.sleep(1.05)                                      # a later start would see another ${now:...}
    delayed = DelayedSubmission.load(next(sweep_dir.glob(".submitit/4242/4242_submitted.pkl")))
    job_launcher, (overrides, _, job_num, _, _) = delayed.function, delayed.args
    job_cfg = job_launcher.hydra_context.config_loader.load_sweep_config(job_launcher.config, list(overrides))
    assert job_num == 0 and job_cfg.seed == 43 and job_cfg.optimizer.name == "sgd_ll"
    assert Path(job_cfg.hydra.sweep.dir) == sweep_dir
    job_cfg.hydra.job.num = job_num                       # as the launcher sets it in the job
    assert job_cfg.hydra.sweep.subdir == "0_sgd_ll_130m_lr100.0_seed43"
    callbacks = OmegaConf.to_container(job_cfg.hydra.callbacks)
    assert callbacks == {"sweep_report": {"_target_": "llmopt.train.sweep.SweepReport"},
                         "slurm_env": {"_target_": "llmopt.slurm.SlurmEnvCallback"}}


# -- the sbatch templates (slurm/) --------------------------------------------------------------------------------

TEMPLATES = ["single_node.sbatch", "multi_node.sbatch"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_header_has_the_variables_to_edit(name):
    text = (ROOT / "slurm" / name).read_text()
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / name)], check=True)
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    flags = _sbatch_flags("\n".join(lines[:first_command]))        # sbatch reads #SBATCH up to here
    assert {"partition", "account", "nodes", "gpus-per-node", "time", "signal", "requeue"} <= set(flags)
    assert flags["signal"] == "B:USR1@300" and flags["ntasks-per-node"] == "1"
    assert flags["nodes"] == ("1" if name == "single_node.sbatch" else "2")
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])


def _run_template(name: str, log: Path, tmp_path: Path, nodes: int, exit_code: int = 0, extra_env=None,
                  wait_signal: bool = False):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))},
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "llmopt", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": "gpu[01-02]" if nodes == 2 else "gpu01", "SLURM_NTASKS": str(nodes),
           "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT),
           "RUN_ROOT": str(tmp_path / "runs"), "FAKE_EXIT": str(exit_code),
           "FAKE_RUN_DIR": str(tmp_path / "runs" / "llmopt_4242"), **(extra_env or {})}
    if wait_signal:
        env["FAKE_WAIT_SIGNAL"] = "1"
    command = ["bash", str(ROOT / "slurm" / name), "experiment=scale_table/scale_60m", "logger.wandb.tags=[a b]"]
    if not wait_signal:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60).returncode
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log / "accelerate.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)                   # SLURM's warning before the time limit
    process.communicate(timeout=30)
    return process.returncode


def test_single_node_template_launches_accelerate_per_gpu(tmp_path, fake_slurm):
    assert _run_template("single_node.sbatch", fake_slurm, tmp_path, nodes=1) == 0
    calls = [json.loads(line) for line in _lines(fake_slurm / "accelerate.jsonl")]
    assert calls == [["launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_machines", "1",
                      "--machine_rank", "0", "--num_processes", "4", "--main_process_ip", "gpu01",
                      "--main_process_port", str(20000 + 4242), "-m", "llmopt.train",
                      f"hydra.run.dir={tmp_path / 'runs' / 'llmopt_4242'}", "experiment=scale_table/scale_60m",
                      "logger.wandb.tags=[a b]"]]
    assert _lines(fake_slurm / "scontrol.log") == []


def test_multi_node_template_gives_each_node_its_rank(tmp_path, fake_slurm):
    assert _run_template("multi_node.sbatch", fake_slurm, tmp_path, nodes=2,
                         extra_env={"ACCELERATE_CONFIG": "configs/accelerate/fsdp2.yaml"}) == 0
    calls = [json.loads(line) for line in _lines(fake_slurm / "accelerate.jsonl")]
    assert len(calls) == 2
    for node, call in enumerate(calls):
        options = dict(zip(call[1:call.index("-m"):2], call[2:call.index("-m"):2]))
        assert options == {"--config_file": "configs/accelerate/fsdp2.yaml", "--num_machines": "2",
                           "--num_processes": "8", "--main_process_ip": "gpu01",
                           "--main_process_port": str(20000 + 4242), "--machine_rank": str(node)}
        assert call[call.index("-m"):] == ["-m", "llmopt.train", f"hydra.run.dir={tmp_path / 'runs' / 'llmopt_4242'}",
                                           "experiment=scale_table/scale_60m", "logger.wandb.tags=[a b]"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_requeues_on_exit_75_only(tmp_path, fake_slurm, name):
    nodes = 1 if name == "single_node.sbatch" else 2
    assert _run_template(name, fake_slurm, tmp_path, nodes=nodes, exit_code=75) == 75
    assert _lines(fake_slurm / "scontrol.log") == ["requeue 4242"]
    assert _run_template(name, fake_slurm, tmp_path, nodes=nodes, exit_code=75,
                         extra_env={"SLURM_RESTART_COUNT": "20"}) == 75       # MAX_REQUEUES reached
    assert _run_template(name, fake_slurm, tmp_path, nodes=nodes, exit_code=1) == 1
    assert _lines(fake_slurm / "scontrol.log") == ["requeue 4242"]


def test_template_checkpoints_and_requeues_near_the_time_limit(tmp_path, fake_slurm):
    """USR1 to the script: the job step gets SIGTERM (scancel), the run writes a preempted summary and
    exits through its launcher with 1 (not 75): the script still requeues, from summary.json."""
    code = _run_template("single_node.sbatch", fake_slurm, tmp_path, nodes=1, exit_code=1, wait_signal=True)
    assert code == 1
    assert _lines(fake_slurm / "scancel.log") == ["--signal=TERM 4242"]
    assert _lines(fake_slurm / "scontrol.log") == ["requeue 4242"]


# -- configs/accelerate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, multi_gpu, fsdp", [("single_gpu", False, False), ("ddp", True, False),
                                                   ("fsdp2", False, True)])
def test_accelerate_configs_load_as_accelerate_launch_reads_them(name, multi_gpu, fsdp, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "8", "-m",
                                               "llmopt.train", "experiment=scale_table/adam_60m"])
    args, config, _ = _validate_launch_command(args)      # unknown keys or values are refused here
    assert (args.multi_gpu, args.use_fsdp, args.module) == (multi_gpu, fsdp, True)
    assert config.mixed_precision == "no"                 # llmopt's trainer.precision decides, not accelerate
    if fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)
        monkeypatch.setattr(os, "environ", {**os.environ, **env})
        plugin = FullyShardedDataParallelPlugin()        # what the Accelerator of each process builds
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
