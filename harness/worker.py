"""Long-lived job workers: a workflow job pays Python's and torch's start-up once per worker, not per cell.

A grid is hundreds of small jobs (one per cell and stage), so Snakemake's incremental reruns and per-cell
failure stay exact; but a fresh process per job spends about 1.6 s importing torch for 0.2 s of sampling.
The rules therefore run `stepbench-job <stepbench command>`: a client that imports nothing but the standard
library and hands its command line, working directory, environment and standard streams (the file
descriptors themselves, over a Unix socket) to a warm worker process, which runs the same `stepbench`
command in-process and returns its exit code. This is the pattern of Bazel's persistent workers; no
maintained Python library does it for Snakemake jobs.

- **Seats.** A worker serves one job at a time. Seat i of a key is a lock file and a socket; a client takes
  the first seat whose lock is free (flock), starts its worker if none answers, and holds the lock until its
  job ends. So there are at most as many workers as jobs ever ran side by side, and no scheduling here.
- **Keys.** Workers differ by what a process cannot change once started: the interpreter and the
  environment variables in KEY_ENV (threads, visible GPUs, PYTHONPATH, caches). A job gets a worker started
  with exactly its values.
- **Stale code.** Before each job a worker checks the files of the modules it imported from outside the
  interpreter's prefixes (stepbench itself, a user's solver plugin); if one changed, it retires and the
  client starts a fresh one.
- **A client that dies** (Snakemake cancelled, the job killed) closes its socket; the worker sees it and
  exits at once instead of finishing the job. Outputs are written atomically, so none is left half-written.
- **Idle workers** exit after STEPBENCH_WORKER_IDLE_S seconds (default 30) without a job.
- **GPU slots.** `--gpus N` (the rule's `resources.gpu`) gives the job one device of its own: the first
  device whose slot lock is free, as CUDA_VISIBLE_DEVICES, held for the job's life. With
  `snakemake --resources gpu=N` at most N such jobs run at once, so each gets a distinct device.

STEPBENCH_WORKERS=0 runs each job in its own process instead (the plain `stepbench` command).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

# A worker is started with these and cannot change them later (thread pools, CUDA, sys.path, caches are
# fixed at start-up or import): jobs that differ in one of them get different workers.
KEY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH",
           "STEPBENCH_CACHE", "HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TORCH_HOME", "XDG_CACHE_HOME",
           "VIRTUAL_ENV", "LD_LIBRARY_PATH")
START_TIMEOUT_S = 120.0  # a cold start imports torch; on a busy node that can take a while
MAX_MESSAGE = 1 << 22


def idle_seconds() -> float:
    return float(os.environ.get("STEPBENCH_WORKER_IDLE_S", "30"))


def worker_dir() -> Path:
    """Sockets and locks, node-local (a cluster node's /tmp), private to the user."""
    path = Path(os.environ.get("STEPBENCH_WORKER_DIR") or f"/tmp/stepbench-workers-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def worker_key(env: dict[str, str]) -> str:
    blob = json.dumps([sys.executable, str(Path(__file__).resolve().parent), [env.get(k) for k in KEY_ENV]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- GPU slots ---------------------------------------------------------------------------------------

def gpu_devices(env: dict[str, str]) -> list[str]:
    """The devices a job may be given: STEPBENCH_GPU_DEVICES if set, else the CUDA_VISIBLE_DEVICES list, else
    the NVIDIA driver's GPUs; none on a machine without them (the job then runs on the CPU)."""
    for name in ("STEPBENCH_GPU_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if env.get(name) is not None:
            return [d.strip() for d in env[name].split(",") if d.strip()]
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def acquire_gpu_slot(devices: list[str], lock_dir: Path, wait_s: float = 3600.0):
    """(device, held lock file) for the first device whose slot is free; waits while all are taken (more GPU
    jobs than `--resources gpu=N` allows should not happen). (None, None) when there are no devices."""
    if not devices:
        return None, None
    deadline = time.monotonic() + wait_s
    while True:
        for device in devices:
            held = _try_lock(lock_dir / f"gpu-{device.replace('/', '_')}.lock")
            if held is not None:
                return device, held
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU slot among {devices} after {wait_s:.0f} s")
        time.sleep(0.2)


def _try_lock(path: Path):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


# --- client ------------------------------------------------------------------------------------------

def client_main(argv: list[str] | None = None) -> None:
    """`stepbench-job [--gpus N] <stepbench command ...>`: run a stepbench command in a warm worker."""
    argv = list(sys.argv[1:] if argv is None else argv)
    gpus = 0
    if argv[:1] == ["--gpus"]:
        gpus, argv = int(float(argv[1])), argv[2:]
    env = dict(os.environ)
    directory = worker_dir()
    slot = None
    if gpus > 0:
        device, slot = acquire_gpu_slot(gpu_devices(env), directory)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
    if env.get("STEPBENCH_WORKERS", "1") == "0":
        os.environ.update(env)
        from harness.cli import run

        sys.exit(run(argv))
    sys.exit(run_in_worker(argv, env, directory))


def run_in_worker(argv: list[str], env: dict[str, str], directory: Path) -> int:
    key = worker_key(env)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    seat = 0
    while True:
        held = _try_lock(directory / f"{key}-{seat}.lock")
        if held is None:
            seat += 1
            continue
        with held:
            path = directory / f"{key}-{seat}.sock"
            for _ in range(3):  # a retiring (stale) worker is replaced by a fresh one
                connection = _connect(path) or _start_worker(path, env)
                reply = _exchange(connection, request)
                if reply.get("stale"):
                    connection.close()
                    continue
                return int(reply["exit"])
        raise RuntimeError(f"stepbench-job: the worker at {path} kept retiring")


@contextlib.contextmanager
def _socket_address(path: Path):
    """A Unix socket's address for bind/connect. Linux caps it at 107 bytes, and a grid's directory (a pytest tmp
    dir, a cluster's scratch) can be longer: then the socket is named through its directory's descriptor."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def _connect(path: Path):
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_address(path) as address:
            connection.connect(address)
        return connection
    except OSError:  # none listening: a worker that idled out, or one killed before it could remove it
        connection.close()
        path.unlink(missing_ok=True)
        return None


def _start_worker(path: Path, env: dict[str, str]):
    log = open(path.with_suffix(".log"), "ab")
    log_start = log.tell()  # this start's own lines, for the reason it gives should it die
    worker = subprocess.Popen([sys.executable, "-m", "harness.worker", str(path)], env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            connection = _connect(path)
            if connection is not None:
                return connection
        if worker.poll() is not None:  # it died starting: say why now, not after the timeout
            with open(path.with_suffix(".log"), "rb") as text:
                text.seek(log_start)
                lines = text.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            errors = [line for line in lines if re.match(r"\w+(Error|Exception|Exit)\b", line)]  # a traceback's end
            raise RuntimeError(f"stepbench-job: the worker at {path} exited while starting: {(errors or lines)[-1]}")
        time.sleep(0.02)
    raise RuntimeError(f"stepbench-job: no worker answered at {path} within {START_TIMEOUT_S:.0f} s "
                       f"(see {path.with_suffix('.log')})")


def _exchange(connection: socket.socket, request: bytes) -> dict:
    socket.send_fds(connection, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    reply = _read_message(connection)
    if reply is None:
        raise RuntimeError("stepbench-job: the worker died during the job (see its log in "
                           f"{worker_dir()})")
    return reply


def _read_message(connection: socket.socket) -> dict | None:
    data = b""
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data[8:8 + int.from_bytes(data[:8], "big")])


def _send_message(connection: socket.socket, message: dict) -> None:
    body = json.dumps(message).encode()
    connection.sendall(len(body).to_bytes(8, "big") + body)


# --- worker ------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.with_name(path.name.removesuffix(".sock") + ".lock")
        self.module_stamps: dict[str, float] = {}

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        with _socket_address(staging) as address:
            listener.bind(address)
        listener.listen(1)
        self.path.with_suffix(".pid").write_text(str(os.getpid()))
        os.replace(staging, self.path)  # appears only once it accepts
        listener.settimeout(idle_seconds())
        self._stamp_modules()
        try:
            while True:
                try:
                    connection, _ = listener.accept()
                except socket.timeout:
                    if self._retire_if_idle():
                        return
                    continue
                connection.settimeout(None)
                with connection:
                    if not self._serve_one(connection):
                        return
        finally:
            listener.close()

    def _retire_if_idle(self) -> bool:
        """Retire unless a client holds this seat (it is about to connect)."""
        held = _try_lock(self.lock_path)
        if held is None:
            return False
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".pid").unlink(missing_ok=True)
        held.close()
        return True

    def _serve_one(self, connection: socket.socket) -> bool:
        message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
        while len(message) < 8 or len(message) < 8 + int.from_bytes(message[:8], "big"):
            chunk = connection.recv(MAX_MESSAGE)
            if not chunk:
                return True
            message += chunk
        request = json.loads(message[8:])
        if self._code_changed():
            self.path.unlink(missing_ok=True)
            _send_message(connection, {"stale": True})
            return False
        done = threading.Event()
        threading.Thread(target=_exit_if_client_dies, args=(connection, done), daemon=True).start()
        code = _run_request(request, fds)
        self._stamp_modules()
        done.set()
        _send_message(connection, {"exit": code})
        return True

    def _stamp_modules(self) -> None:
        """Remember the files of the modules imported from outside the interpreter (stepbench, plugins)."""
        prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if file and file not in self.module_stamps and not file.startswith(prefixes):
                try:
                    self.module_stamps[file] = os.stat(file).st_mtime
                except OSError:
                    pass

    def _code_changed(self) -> bool:
        for file, stamp in self.module_stamps.items():
            try:
                if os.stat(file).st_mtime != stamp:
                    return True
            except OSError:
                return True
        return False


def _exit_if_client_dies(connection: socket.socket, done: threading.Event) -> None:
    try:
        lost = connection.recv(1) == b""
    except OSError:
        lost = True
    if lost and not done.is_set():
        os._exit(137)  # its job is void; outputs are written atomically, so nothing half-written remains


def _run_request(request: dict, fds: list[int]) -> int:
    """Run one stepbench command as the client would have: its streams, directory and environment."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(target) for target in (0, 1, 2)]
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    environ = dict(os.environ)
    cwd = os.getcwd()
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        _reset_per_job_state()
        from harness.cli import run

        return run(request["argv"])
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # what a fresh process would print before exiting with 1
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        for target, fd in zip((0, 1, 2), saved):
            os.dup2(fd, target)
            os.close(fd)


def _reset_per_job_state() -> None:
    """What a fresh process would start with: the job's thread count (an earlier job may have chosen
    another), the commit of the checkout (it may have moved since), warnings shown again."""
    torch = sys.modules.get("torch")
    if torch is not None:
        from harness.threads import job_threads

        torch.set_num_threads(job_threads())
    provenance = sys.modules.get("harness.provenance")
    if provenance is not None:
        provenance.git_commit.cache_clear()
    warnings._filters_mutated()  # forget which warnings were shown once already


if __name__ == "__main__":
    Worker(Path(sys.argv[1])).serve()
