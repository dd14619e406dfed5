"""Several processes (torch.distributed on gloo, real processes started by torchrun or accelerate launch) train
exactly as one, and stay in step when one of them meets something the others do not: an out-of-memory error, a
micro-batch cache entry, a kill, a checkpoint from another number of processes.

The reference is one uninterrupted 2-process run with the gradient cache (micro-batch 5 of 12 per process) and
an uneven end of epoch (128 pairs in batches of 24: 8 pairs dropped per epoch, the same ones whatever the number
of processes). A hang would be a failure, not a wait: every job runs with ``train.dist_timeout`` 2 minutes and a
subprocess timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import launcher_env, micro_config, run_job, run_torchrun, torchrun_command
from safetensors.torch import load_file

from finderpartner.cli import main
from finderpartner.config import config_from_dict
from finderpartner.train import train

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

WORKER = str(Path(__file__).with_name("distributed_run.py"))  # finderpartner's command line, faults optional
RUN = dict(epochs=4, batch_size=24, micro_batch_size=5, checkpoint_every=4, dist_timeout="2m")
STEPS = 20  # 5 per epoch


def _config_file(tmp: Path, data: Path, experiment: str, **train: object) -> Path:
    raw = {**micro_config(tmp, data, **{**RUN, **train}), "experiment": experiment}
    path = tmp / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors"), json.loads((newest / "state.json").read_text())


def _train_2(
    config: Path, *extra: str, quiet: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``finderpartner train`` in 2 processes; ``quiet``: warnings and errors only."""
    flags = ["-q"] if quiet else []
    run = run_torchrun(WORKER, *flags, "train", "--config", str(config), *extra, env=env, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def two_processes(small_data: Path, outputs: Path) -> Path:
    """The run folder of the uninterrupted 2-process reference run."""
    _train_2(_config_file(outputs, small_data, "two"))
    return outputs / "outputs" / "two"


def test_two_processes_with_the_gradient_cache_and_an_uneven_epoch_match_one_process(
    small_data: Path, outputs: Path, two_processes: Path
) -> None:
    one = train(config_from_dict({**micro_config(outputs, small_data, **RUN), "experiment": "one"}))
    ours, state = _final(two_processes)
    theirs, _ = _final(one.run_dir)
    assert state["trainer"]["global_step"] == one.state.global_step == STEPS and state["world_size"] == 2
    assert state["trainer"]["micro_batch_size"] == 5  # 12 per process: micro-batches of 5, 5 and 2
    # Not bitwise: the two halves of each gradient are summed across processes instead of inside one matmul.
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"\n2 gloo processes (gradient cache 5 of 12) vs 1 process: max abs weight difference {worst:.2e}")
    assert worst <= 1e-5, worst
    lines = [(two_processes / "metrics.jsonl"), (one.run_dir / "metrics.jsonl")]
    assert [sum("train/loss" in x for x in p.read_text().splitlines()) for p in lines] == [STEPS // 2] * 2


def test_an_out_of_memory_error_in_one_process_halves_the_micro_batch_in_all(
    small_data: Path, outputs: Path, two_processes: Path
) -> None:
    # Step 3, pass 2 of the gradient cache (its 17th embedding call: 3 micro-batches x 2 passes a step) in
    # process 1 only: process 0 has finished its step by then and waits at the vote, not in a gradient exchange.
    config = _config_file(outputs, small_data, "oom")
    run = _train_2(config, env={"FP_TEST_OOM_RANK": "1", "FP_TEST_OOM_CALL": "17"})
    log = run.stdout + run.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING out of memory at step 3: micro-batch halved to 2, redoing the step" in log, log
    ours, state = _final(outputs / "outputs" / "oom")
    theirs, _ = _final(two_processes)
    assert state["trainer"]["micro_batch_size"] == 2 and state["trainer"]["global_step"] == STEPS
    # Equal up to float rounding: steps 3-20 sum the same gradient in another order (micro-batches of 2, not 5).
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"\nOOM in process 1 at step 3, recovered by both: max abs weight difference {worst:.2e}")
    assert worst <= 1e-5, worst


def test_a_killed_2_process_run_resumes_from_the_broadcast_checkpoint_bitwise(
    small_data: Path, outputs: Path, two_processes: Path
) -> None:
    config = _config_file(outputs, small_data, "killed")
    run_dir = outputs / "outputs" / "killed"
    job = subprocess.Popen(
        torchrun_command(WORKER, "-q", "train", "--config", str(config)),
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step_000004" / "manifest.json").is_file() and job.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both training processes
    job.wait()
    _, killed_at = _final(run_dir)
    assert killed_at["trainer"]["global_step"] < STEPS, "the run finished before it could be killed"

    run = _train_2(config, "--resume", "auto", quiet=False)
    log = run.stdout + run.stderr
    assert f"resumed from {run_dir / 'checkpoints'}" in log and log.count("resumed from") == 1  # said once, by rank 0
    ours, state = _final(run_dir)
    theirs, _ = _final(two_processes)
    assert state["trainer"]["global_step"] == STEPS
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "not bitwise equal to the uninterrupted run"
    print(f"\nkilled after step {killed_at['trainer']['global_step']}, resumed by 2 processes: bitwise equal")


def test_sigterm_to_one_process_stops_both_at_one_step_with_a_checkpoint_and_resumes_bitwise(
    small_data: Path, outputs: Path, two_processes: Path
) -> None:
    """SIGTERM to rank 1 only (the one that does not write checkpoints): at the next step boundary both processes
    vote to stop, rank 0 writes the checkpoint of that step, both stop (exit 12); the resumed run is bitwise equal
    to the uninterrupted one."""
    config = _config_file(outputs, small_data, "sigterm", checkpoint_every=1000, log_every=1)
    run_dir, pids = outputs / "outputs" / "sigterm", outputs / "pids"
    pids.mkdir()
    job = subprocess.Popen(
        torchrun_command(WORKER, "train", "--config", str(config)),
        env=launcher_env(FP_TEST_PID_DIR=str(pids)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "no 3 steps within 4 minutes"
            time.sleep(0.01)
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    log = out + err
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1, log[-4000:]
    step = int(saved[0].name.split("_")[1])
    assert 3 <= step < STEPS and json.loads((saved[0] / "state.json").read_text())["world_size"] == 2
    assert "[rank 1] WARNING SIGTERM received: finishing the current step and writing a checkpoint" in log, log[-4000:]
    assert f"[rank 1] stopped: SIGTERM: stopped with the other processes after step {step}" in log, log[-4000:]
    assert (
        f"[rank 0] stopped: a stop signal to another process: stopped after step {step} of {STEPS} and saved "
        f"checkpoint {saved[0]}; continue with --resume auto: finderpartner train --config {config} --resume auto "
        "(with the same launcher)"
    ) in log, log[-4000:]
    # Rank 1 left with 12. Rank 0 left with 12 too, unless torchrun, seeing rank 1 gone, stopped it first (its
    # message above is already out). The one traceback is torchrun's own report of workers that exited non-zero.
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid:", log)
    assert "12" in codes and set(codes) <= {"12", "-15"}, log[-4000:]
    assert log.count("Traceback") == 1 and "ChildFailedError" in log, log[-4000:]

    _train_2(config, "--resume", "auto")
    ours, state = _final(run_dir)
    theirs, _ = _final(two_processes)
    assert state["trainer"]["global_step"] == STEPS
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "not bitwise equal to the uninterrupted run"
    print(f"\nSIGTERM to rank 1 after step {step}: both stopped and checkpointed; resumed bitwise equal")


def test_a_2_process_checkpoint_resumes_in_1_process_with_the_batches_re_split(
    small_data: Path, outputs: Path, two_processes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = two_processes / "checkpoints" / "step_000016"
    cfg = config_from_dict({**micro_config(outputs, small_data, **RUN), "experiment": "two_then_one"})
    with caplog.at_level("INFO", logger="finderpartner"):
        result = train(cfg, resume=str(checkpoint))
    assert "trained by 2 process(es), this run has 1: each contrastive batch of 24 is re-split" in caplog.text
    ours, _ = _final(result.run_dir)
    theirs, _ = _final(two_processes)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert result.state.global_step == STEPS and worst <= 1e-5, worst


def test_processes_that_disagree_about_the_micro_batch_cache_agree_on_the_smallest(
    small_data: Path, outputs: Path
) -> None:
    # The probe runs nothing across processes, then all of them take the smallest size found. Before, a cache hit
    # in one process and a probe in the other left them in different collectives: a hang at step 0.
    caches = outputs / "caches"
    env = {"FP_TEST_CACHE_PER_RANK": str(caches)}
    _train_2(_config_file(outputs, small_data, "probe_a", epochs=1, micro_batch_size="auto"), env=env)
    files = [caches / f"rank{r}" / "micro_batch.json" for r in (0, 1)]
    first = [json.loads(f.read_text()) for f in files]
    assert first[0] == first[1] and len(first[0]) == 1 and list(first[0].values()) == [12]  # the full local batch
    files[1].write_text(json.dumps({key: 3 for key in first[1]}))  # process 1 remembers 3 ...
    files[0].unlink()  # ... process 0 must probe (and would choose 12)
    _train_2(_config_file(outputs, small_data, "probe_b", epochs=1, micro_batch_size="auto"), env=env)
    _, state = _final(outputs / "outputs" / "probe_b")
    assert state["trainer"]["micro_batch_size"] == 3
    assert [json.loads(f.read_text()) for f in files] == [{key: 3 for key in first[0]}] * 2  # the agreed size


def test_two_processes_agree_on_the_step_count_a_time_budget_decides(small_data: Path, tmp_path: Path) -> None:
    # Each process times its own steps; only the main process's decision counts (broadcast). Had they disagreed,
    # one would wait in an all-reduce for a step the other never takes, and torchrun would time out or fail.
    raw = micro_config(tmp_path, small_data, time_budget="20s", max_steps=400, warmup_steps=30, dist_timeout="2m")
    cfg_file = tmp_path / "budget.yaml"
    cfg_file.write_text(yaml.safe_dump({**raw, "experiment": "budget"}))
    run = run_torchrun("-m", "finderpartner.cli", "train", "--config", str(cfg_file), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert log.count("steps planned at") == 1, log[-3000:]  # decided once, by the main process
    newest = sorted((tmp_path / "outputs" / "budget" / "checkpoints").glob("step_*"))[-1]
    state = json.loads((newest / "state.json").read_text())["trainer"]
    assert state["global_step"] == state["planned_steps"] == int(newest.name.split("_")[1]) >= 30


def test_accelerate_launch_runs_two_processes_on_a_cpu_or_says_how(
    small_data: Path, outputs: Path, two_processes: Path
) -> None:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    config = _config_file(outputs, small_data, "accelerate")
    one = run_job([*accelerate, "--num_processes", "2", "-m", "finderpartner.cli", "train", "--config", str(config)])
    assert one.returncode != 0 and not (outputs / "outputs" / "accelerate").exists()
    assert "accelerate launch was asked for 2 processes but started only this one" in one.stderr
    assert "add --multi_gpu" in one.stderr

    args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    run = run_job(
        [
            *accelerate,
            *args,
            "--dynamo_backend",
            "no",
            "-m",
            "finderpartner.cli",
            "-q",
            "train",
            "--config",
            str(config),
        ],
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    ours, state = _final(outputs / "outputs" / "accelerate")
    theirs, _ = _final(two_processes)
    assert state["world_size"] == 2 and all(torch.equal(ours[k], theirs[k]) for k in theirs)  # = the torchrun run


def test_an_accelerate_config_asking_for_fsdp_or_deepspeed_is_refused(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, small_data, "fsdp")
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(variable, "true")
        assert main(["-q", "train", "--config", str(config)]) == 3
        assert f"the accelerate config asks for {name}, which this trainer does not use" in capsys.readouterr().err
        monkeypatch.delenv(variable)
    assert not (tmp_path / "outputs" / "fsdp").exists()
