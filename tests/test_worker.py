"""stepbench-job: workflow jobs run in warm worker processes, with the client's streams, directory, environment
and exit status; a GPU slot per job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

from harness.config import load_models

JOB = [str(Path(sys.executable).parent / "stepbench-job")]
PROBE = '''
import os, time
from pathlib import Path
from harness.methods.solver_base import solver


@solver("probe_env", order=1)
def probe_env(model, x, sigmas, noise=None, seconds=0.0, out=""):
    """Writes the GPU slot it was given, then waits: two of them overlap in time."""
    start = time.time()
    time.sleep(seconds)
    Path(out, f"{time.time_ns()}-{os.getpid()}.json").write_text(__import__("json").dumps(
        {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), "start": start, "end": time.time()}))
    return model(x, sigmas[0])
'''


@pytest.fixture
def workspace(tmp_path):
    """Config files, a plugin solver module, and an environment whose workers live (briefly) in tmp_path."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "lab_probe.py").write_text(PROBE)
    seen = tmp_path / "seen"
    seen.mkdir()
    methods = (REPO / "methods.yaml").read_text() + (
        f"probe:\n  family: solver\n  module: lab_probe\n  solver: probe_env\n"
        f"  params: {{seconds: 1.5, out: '{seen}'}}\n")
    (tmp_path / "methods.yaml").write_text(methods)
    (tmp_path / "models.yaml").write_text((REPO / "models.yaml").read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(plugins), "STEPBENCH_WORKER_DIR": str(tmp_path / "workers"),
           "STEPBENCH_WORKER_IDLE_S": "20", "STEPBENCH_LEDGER": str(tmp_path / "ledger"), "OMP_NUM_THREADS": "1"}
    env.pop("STEPBENCH_WORKERS", None)
    yield tmp_path, env
    for pid in {r["pid"] for r in _ledger(tmp_path)}:  # workers do not outlive the test
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _job(workspace, *args, gpus: int | None = None, background: bool = False):
    where, env = workspace
    command = [*JOB, *(["--gpus", str(gpus)] if gpus is not None else []), *args]
    if background:
        return subprocess.Popen(command, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=300)


def _ledger(where: Path) -> list[dict]:
    folder = where / "ledger"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited worker waits for its adoptive parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _sample(*extra):
    return ["sample", "--model", "gmm2d", "--method", "heun", "--nfe", "9", "--num-samples", "30", *extra]


def test_jobs_share_a_warm_worker_and_give_what_a_fresh_process_gives(workspace):
    where, env = workspace
    first, second = _job(workspace, *_sample("--out", "a")), _job(workspace, *_sample("--out", "b"))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "gmm2d / heun / NFE 9: ok" in first.stdout  # the client's own stdout
    plain = subprocess.run([str(Path(sys.executable).parent / "stepbench"), *_sample("--out", "c")], cwd=where,
                           env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    arrays = [np.load(where / d / "samples.npz")["samples"] for d in ("a", "b", "c")]
    assert np.array_equal(arrays[0], arrays[2]) and np.array_equal(arrays[1], arrays[2])
    pids = [record["pid"] for record in _ledger(where)]
    assert len(pids) == 3 and pids[0] == pids[1] != pids[2]  # two jobs in one worker; the plain run in its own


def test_bad_input_is_one_line_and_the_exit_status_of_the_command(workspace):
    run = _job(workspace, "sample", "--model", "gmm2dd", "--method", "euler", "--nfe", "4", "--out", "x")
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    prefix = "stepbench: error: models.yaml: no model 'gmm2dd' (did you mean 'gmm2d'?); "
    assert line.startswith(prefix), line
    listed = re.sub(r" \(\d+ in all.*\)$", "", line[len(prefix):].split("valid: ", 1)[1]).split(", ")
    assert "gmm2d" in listed and set(listed) <= set(load_models(REPO / "models.yaml")), line
    assert _job(workspace, "nosuchcommand").returncode != 0


def test_an_edited_module_gets_a_fresh_worker(workspace):
    where, _ = workspace
    assert _job(workspace, "sample", "--model", "gmm2d", "--method", "probe", "--nfe", "1", "--out", "p",
                "--num-samples", "4").returncode == 0
    plugin = where / "plugins" / "lab_probe.py"
    plugin.write_text(plugin.read_text().replace("time.sleep(seconds)", "time.sleep(0)"))
    os.utime(plugin, (time.time() + 5, time.time() + 5))  # a new mtime even within the clock's resolution
    assert _job(workspace, "sample", "--model", "gmm2d", "--method", "probe", "--nfe", "1", "--out", "q",
                "--num-samples", "4").returncode == 0
    seen = [r["pid"] for r in sorted((json.loads(p.read_text()) for p in (where / "seen").glob("*.json")),
                                      key=lambda r: r["start"])]
    assert len(seen) == 2 and seen[0] != seen[1]


def test_a_killed_client_ends_its_job_in_the_worker(workspace):
    where, _ = workspace
    client = _job(workspace, "sample", "--model", "gmm2d", "--method", "probe", "--nfe", "1", "--out", "k",
                  "--num-samples", "4", background=True)
    deadline = time.monotonic() + 60
    while not list((where / "workers").glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the worker has the job and sleeps in the probe
    worker = int((where / "workers").glob("*.pid").__next__().read_text())
    client.kill()
    client.wait()
    time.sleep(1.0)  # the probe still sleeps; the worker must not finish the job
    assert not _running(worker)
    assert not (where / "k" / "cell.json").exists()


def test_concurrent_gpu_jobs_get_distinct_devices(workspace):
    """`--gpus 1` (the rule's resources.gpu): each running job holds a device slot of its own, as
    CUDA_VISIBLE_DEVICES; a third job after them reuses a freed one. No GPU needed: the slot is only the env."""
    where, env = workspace
    env["STEPBENCH_GPU_DEVICES"] = "0,1"
    jobs = [_job(workspace, "sample", "--model", "gmm2d", "--method", "probe", "--nfe", "1", "--out", f"g{i}",
                 "--num-samples", "4", gpus=1, background=True) for i in range(2)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
    assert _job(workspace, "sample", "--model", "gmm2d", "--method", "probe", "--nfe", "1", "--out", "g2",
                "--num-samples", "4", gpus=1).returncode == 0
    records = sorted((json.loads(p.read_text()) for p in (where / "seen").glob("*.json")), key=lambda r: r["start"])
    assert records[1]["start"] < records[0]["end"]  # the first two ran side by side
    assert sorted(r["cuda"] for r in records[:2]) == ["0", "1"]  # ... each on a device of its own
    assert records[2]["cuda"] in ("0", "1")
    cells = [json.loads((where / f"g{i}" / "cell.json").read_text()) for i in range(3)]
    assert sorted(c["provenance"]["cuda_visible_devices"] for c in cells[:2]) == ["0", "1"]
    without = _job(workspace, "sample", "--model", "gmm2d", "--method", "euler", "--nfe", "2", "--out", "n",
                   "--num-samples", "4")
    assert "cuda_visible_devices" not in json.loads((where / "n" / "cell.json").read_text())["provenance"]
    assert without.returncode == 0


def test_a_worker_directory_longer_than_a_unix_socket_address(workspace):
    """Linux caps a socket's address at 107 bytes; a grid's directory (pytest's tmp dirs, a cluster's scratch) can be
    longer. Workers there still serve jobs, the same worker twice (found in the kill test: every job failed)."""
    where, env = workspace
    deep = where / ("w" * 60) / ("x" * 60)
    env = {**env, "STEPBENCH_WORKER_DIR": str(deep)}
    assert len(os.fsencode(deep / f"{'0' * 16}-0.sock")) > 108
    runs = [_job((where, env), *_sample("--out", out)) for out in ("long-a", "long-b")]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    pids = [record["pid"] for record in _ledger(where)]
    assert len(pids) == 2 and pids[0] == pids[1]


def test_a_worker_that_dies_starting_is_reported_at_once(workspace):
    """Not after the start timeout (2 minutes), and with the worker's own last line."""
    where, env = workspace
    env = {**env, "STEPBENCH_WORKER_IDLE_S": "soon"}  # read by the worker only, once it listens
    start = time.monotonic()
    run = _job((where, env), *_sample("--out", "never"))
    assert run.returncode != 0 and time.monotonic() - start < 60
    assert "exited while starting: ValueError: could not convert string to float: 'soon'" in run.stderr, \
        run.stderr[-2000:]
