"""The in-sandbox worker: trains one candidate and writes its test predictions.

    python -m deltanas.sandbox.worker WORKDIR DATASET_DIR

WORKDIR holds `job.json` (the Job's fields without `source`) and `model.py`. DATASET_DIR is a
prepared handle (training.load_data); the test labels are not there. The worker writes
WORKDIR/out/predictions.npy (int16 class per test image) and, last, WORKDIR/out/result.json
(status, error, param_count, train_seconds, final_loss).

This file is the job's life cycle: read the settings, ready the device (device_setup.py), import
and build the candidate, train it and predict (training.py), and report (outcome.py), then end
the process without the candidate's atexit hooks. Nothing here knows which backend started it:
a process group or a container both just give it the two directories, and a warm worker
(warm.py) calls `serve` in a forked child.
"""
from __future__ import annotations

import os
import sys

from deltanas.sandbox.device_setup import cap_gpu_memory, use_device, warm_up
from deltanas.sandbox.outcome import Outcome, classify, log, write_predictions, write_result
from deltanas.sandbox.speed import mixed_precision
from deltanas.sandbox.training import Data, Settings, load_data, predict, train

SANDBOX_INIT_ENV = "DELTANAS_SANDBOX_INIT"  # "1": our parent is pid 1 of the job's own pid namespace

_exit = os._exit  # captured before candidate code can rebind it


def load_candidate(path: str):
    """Imports the candidate's source as the module `candidate`, which runs its top-level code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("candidate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["candidate"] = module
    spec.loader.exec_module(module)
    return module


def run(workdir: str, dataset_dir: str, fields: dict, data: Data | None = None) -> None:
    """Trains and predicts the candidate in WORKDIR. Fills `fields` as it goes, so a failure
    still reports what was learnt. `data`: the dataset already loaded (a warm worker's copy);
    loaded from `dataset_dir` when None, or moved when it sits on another device."""
    import json
    import random

    import numpy as np
    import torch

    log(f"torch {torch.__version__} imported")

    with open(os.path.join(workdir, "job.json"), encoding="utf-8") as f:
        s = Settings.from_job(json.load(f))
    torch.set_num_threads(max(1, s.cpu_threads))
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise Outcome("crashed", f"setup: cuda requested but not available (device {s.device!r})")
    device = torch.device(s.device)
    use_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        log(f"on {device}: {props.name}, GPU-{props.uuid}")
    if device.type == "cuda" and s.gpu_memory_mb:
        cap_gpu_memory(device, s.gpu_memory_mb)
    if data is None or data.device != device:
        data = load_data(dataset_dir, device) if data is None else data.to(device)
        warm_up(device)
        log("warmed up")
    # Seeded after the warm-up, which draws from the generators (its layers' initialisation): a
    # job then starts from the same random state in a cold worker as in a warm one's child.
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    c, h, w = data.shape

    phase = "import"
    try:
        module = load_candidate(os.path.join(workdir, "model.py"))
        net_cls = getattr(module, "Net", None)
        if not isinstance(net_cls, type):
            raise Outcome("invalid", "import: the module defines no class `Net`")
        prm = dict(s.hyperparameters)
        phase = "build"
        model = net_cls((s.batch_size, c, h, w), (data.num_classes,), prm, device)
        if not isinstance(model, torch.nn.Module):
            raise Outcome("invalid", "build: Net is not a torch.nn.Module")
        model = model.to(device)
        fields["param_count"] = int(sum(p.numel() for p in model.parameters()))
        if fields["param_count"] <= 0:
            raise Outcome("invalid", "build: Net has no parameters")
        log(f"built Net with {fields['param_count']} parameters on {device}")

        phase = "train"
        speed = train(model, prm, data, s, fields)

        phase = "predict"
        with mixed_precision(device, speed.bf16):
            labels = predict(model, data.x_test, data.mean, data.std, s.batch_size, data.num_classes,
                             speed.channels_last)
        log(f"predicted {len(labels)} test images")
    except BaseException as exc:  # noqa: BLE001 - candidate code may raise anything, SystemExit included
        raise classify(exc, phase) from None
    write_predictions(os.path.join(workdir, "out"), labels)


def serve(workdir: str, dataset_dir: str, data: Data | None = None) -> None:
    """Runs one job to its result file, then ends the process without running the candidate's
    atexit hooks or waiting for threads it left behind."""
    import signal

    # Python ignores SIGXFSZ; restored, a write past RLIMIT_FSIZE kills the process
    # with a signal the host reads as output_limit, whatever the candidate catches.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    out_dir = os.path.join(workdir, "out")
    os.makedirs(out_dir, exist_ok=True)
    fields: dict = {"status": "ok", "error": "", "param_count": None, "train_seconds": None, "final_loss": None}
    try:
        run(workdir, dataset_dir, fields, data)
    except Outcome as o:
        fields["status"], fields["error"] = o.status, o.error
    except BaseException as exc:  # noqa: BLE001 - the worker's own setup failed
        o = classify(exc, "setup")
        fields["status"], fields["error"] = o.status, o.error
    if fields["status"] != "ok":
        log(f"{fields['status']}: {fields['error']}")
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - a broken stdout must not lose the result
        pass
    write_result(out_dir, fields)
    _exit(0)


def die_with_driver() -> None:
    """Ask the kernel to kill this worker when the driver that started it dies
    (a `kill -9` of `deltanas run` must not leave workers training on)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # Set here rather than before exec: entering the user namespace changes credentials,
    # which clears the setting. If the driver died before this point, stop now. Under
    # bubblewrap, pid 1 is the sandbox's own init (it dies with the driver), not a reaper.
    if os.getppid() == 1 and os.environ.get(SANDBOX_INIT_ENV) != "1":
        os._exit(3)


def main(argv: list[str]) -> None:
    die_with_driver()
    workdir, dataset_dir = argv
    serve(workdir, dataset_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.stderr.write("usage: python -m deltanas.sandbox.worker WORKDIR DATASET_DIR\n")
        sys.exit(2)
    main(sys.argv[1:])
