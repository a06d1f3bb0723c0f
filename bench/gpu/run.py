"""GPU benchmark: raytseg against TotalSegmentator 2.18 on one GPU, same CT, same weights.

One script for one device call (``bench/gpu/device.sh`` installs the carried wheels and
runs it). Every step is recorded in ``<out>/gpu_bench.json`` as soon as it ends, and steps
that would start after ``--deadline-s`` are skipped (and said to be), so a run cut short
still reports what it measured. First the benchmark CT (``make_realistic_ct.py``: 469 x 388
x 224 at 0.78 x 0.78 x 1.5 mm) and realistic-size synthetic weights. Then, by default
(``run_all``; the batch mode's in-process figures come before its expensive cold runs):

- per mode, a cold CLI run of raytseg and of TotalSegmentator (``--ml``), wall time, peak
  GPU memory (nvidia-smi, every 100 ms), and the per-class Dice of the two outputs;
- in one process with the models loaded: the warm per-image time (median of ``--repeat``)
  with its stage split, the same with the resampling left on the CPU (scipy) and the voxels
  that differ, peak GPU memory (torch's allocator); the bare sliding windows (nnU-Net's
  ``predict_sliding_window_return_logits``, synchronised) and, per ``--tiles``, the batched
  window with the labels it changes; a cProfile of one warm image;
- a batch of ``--batch`` images (the CT shifted by k HU) through the stage functions,
  preparation and finishing in worker threads while the main thread runs the networks, as
  the Ray batch job overlaps them: wall time, images/hour, GPU busy share (nvidia-smi's
  utilization.gpu over the batch), model-stage share of the wall time.

With ``--parity`` (``run_parity``): both tools with cuDNN autotuning off (TotalSegmentator
through a patched nnU-Net predictor), their Dice, and how far an earlier autotuned
TotalSegmentator output (``--ts-reference``) lies from them; a cProfile of the cold CLI;
the windows with autotuning off and on.

Ray is not installed on the device machine (its wheel alone is over the carry limit), so
the Serve application with fractional-GPU replicas is not measured here.

    python3 bench/gpu/run.py --device cuda --out $OUT            # on the device
    .venv/bin/python bench/gpu/run.py --device cpu --tiny --out bench/out/gpu-cpu   # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from core_bench import ts_home  # noqa: E402
from make_realistic_ct import make  # noqa: E402

MODES = {"fast": ["--fast"], "total": []}


class Report:
    """The JSON report, rewritten after every step."""

    def __init__(self, path: Path, deadline_s: float) -> None:
        self.path = path
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
        self.deadline = time.perf_counter() + deadline_s

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; past the deadline it is skipped (and said to be)."""
        started = time.perf_counter()
        if started > self.deadline:
            self.data["steps"][name] = {"ok": False, "error": "skipped: past the deadline"}
            self.save()
            return None
        try:
            value = fn()
            shown = value if isinstance(value, dict | list | str | int | float) else type(value).__name__
            entry: dict[str, Any] = {"ok": True, "result": shown}
        except Exception as exc:  # a failed step is reported, the others still run
            value = None
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        self.data["steps"][name] = entry
        self.save()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(entry, default=str)[:600]}", flush=True)
        return value

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


class GpuSampler:
    """nvidia-smi's utilization and memory every 100 ms, while a block runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, MiB used)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @contextmanager
    def running(self) -> Iterator[GpuSampler]:
        self.samples = []
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        try:
            self._proc = subprocess.Popen([*cmd, "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            self._proc = None
        if self._proc is not None:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        try:
            yield self
        finally:
            if self._proc is not None:
                self._proc.terminate()
                self._proc.wait()
                if self._reader is not None:
                    self._reader.join(timeout=2)

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def busy_share(self, start: float, stop: float) -> float | None:
        inside = [u for t, u, _ in self.samples if start <= t <= stop]
        return round(statistics.mean(inside) / 100, 3) if inside else None

    def peak_mib(self) -> float | None:
        return max((m for _, _, m in self.samples), default=None)


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    for name in ("nnunetv2", "totalsegmentator", "numpy", "scipy", "nibabel"):
        info[name] = _version(name)
    return info


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def synth_weights(root: Path, tiny: bool) -> dict[str, Any]:
    from raytseg.weights.synth import synthesize_task

    marker = root / ".done"
    if not marker.exists():
        synthesize_task("total", root, fast=True, tiny=tiny)
        synthesize_task("total", root, tiny=tiny)
        marker.touch()
    return {"root": str(root), "tiny": tiny}


# TotalSegmentator as its CLI runs it; NO_AUTOTUNE also undoes the cuDNN autotuning that
# nnU-Net's predictor turns on, so both tools can be compared with the same kernels.
TS_ENTRY = "from totalsegmentator.bin.TotalSegmentator import main; main()"
TS_NO_AUTOTUNE = """
import torch
from nnunetv2.inference import predict_from_raw_data as p
init = p.nnUNetPredictor.__init__
def no_autotune(self, *a, **k):
    init(self, *a, **k)
    torch.backends.cudnn.benchmark = False
p.nnUNetPredictor.__init__ = no_autotune
"""


def cold_cli(
    tool: str, ct: Path, out: Path, mode: str, args: argparse.Namespace, **how: Any
) -> dict[str, Any]:
    """One cold CLI run (a fresh interpreter), wall time and peak GPU memory.

    ``how``: ``autotune`` (bool: cuDNN autotuning in that run), ``profile`` (a path: the
    run's cProfile, top functions by cumulative time, written there).
    """
    gpu_flag = "gpu" if args.device == "cuda" else "cpu"
    env = {
        **os.environ,
        "RAYTSEG_WEIGHTS": str(args.weights),
        "TOTALSEG_HOME_DIR": str(ts_home(args.weights)),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RAYTSEG_CUDNN_AUTOTUNE": "1" if how.get("autotune") else "0",
    }
    if tool == "raytseg":
        profile = ["-m", "cProfile", "-o", str(args.work / "cold.prof")] if how.get("profile") else []
        cmd = [sys.executable, *profile, "-m", "raytseg.cli", "segment"]
    else:
        entry = TS_ENTRY if how.get("autotune", True) else TS_NO_AUTOTUNE + TS_ENTRY
        cmd = [args.ts_python, "-c", entry]
    cmd += ["-i", str(ct), "-o", str(out), "--ml", "-q", *MODES[mode], "-d", gpu_flag]
    sampler = GpuSampler()
    with sampler.running():
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.work)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}")
    if how.get("profile"):
        _write_profile(args.work / "cold.prof", how["profile"])
    return {"wall_s": round(wall, 2), "peak_gpu_mib": sampler.peak_mib(), "autotune": how.get("autotune")}


def _write_profile(stats_file: Path, out: Path) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(str(stats_file), stream=text).sort_stats("cumulative").print_stats(60)
    out.write_text(text.getvalue())


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Per-class Dice of two label maps, from one joint histogram (fast on 40M voxels)."""
    a = np.asanyarray(nib.load(ours).dataobj).astype(np.int64).ravel()
    b = np.asanyarray(nib.load(theirs).dataobj).astype(np.int64).ravel()
    joint = np.bincount(a * 256 + b, minlength=256 * 256).reshape(256, 256)
    both, in_a, in_b = np.diag(joint)[1:], joint.sum(1)[1:], joint.sum(0)[1:]
    present = (in_a + in_b) > 0
    dice = 2 * both[present] / (in_a[present] + in_b[present])
    return {
        "min_class_dice": round(float(dice.min(initial=1.0)), 6),
        "classes": int(present.sum()),
        "voxels_differ": int(joint.sum() - np.trace(joint)),
    }


class Warm:
    """raytseg in one process, models loaded once: warm time, stages, bare windows."""

    def __init__(self, args: argparse.Namespace) -> None:
        from raytseg.config import Settings
        from raytseg.pipeline.load import LoadLimits
        from raytseg.pipeline.model import configure_torch, select_device
        from raytseg.pipeline.run import Segmenter
        from raytseg.weights.store import WeightsStore

        settings = Settings.from_env({**os.environ, "RAYTSEG_WEIGHTS": str(args.weights)})
        self.device = select_device("gpu" if args.device == "cuda" else "cpu")
        configure_torch(self.device)
        self.segmenter = Segmenter(WeightsStore(settings), self.device, progress=lambda _: None)
        self.limits = LoadLimits.from_settings(settings)
        self.args = args

    def models(self, mode: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """The pass of ``total`` in ``mode``, its networks and plans, by model key."""
        from raytseg.pipeline.plan import Pass, plan_run
        from raytseg.pipeline.preprocess import model_key
        from raytseg.pipeline.records import SegmentOptions

        options = SegmentOptions(fast=mode == "fast")
        plan = plan_run(options)  # one pass: no crop for total / total --fast
        models = {model_key(s): self.segmenter.model(s) for s in plan.main.models}
        plans = {model_key(s): self.segmenter.plans(s) for s in plan.main.models}
        return Pass(plan, options), models, plans

    def one_image(self, ct: Path, mode: str, resample_on_device: bool) -> tuple[float, dict[str, float], Any]:
        from raytseg.pipeline.load import load_volume
        from raytseg.pipeline.passes import finish, prepare

        step, models, plans = self.models(mode)
        device = self.device if resample_on_device and self.device.type == "cuda" else None
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            volume = load_volume(ct, self.limits)
        with _timed(timings, "preprocess"):
            prepared = prepare(volume, step, plans, None, device=device)
        with _timed(timings, "model"):
            outputs = [models[item.model_key].predict(item) for item in prepared.inputs]
        with _timed(timings, "postprocess"):
            seg = finish(volume, step, prepared, outputs, None, device=device)
        return time.perf_counter() - started, timings, seg.labels

    def warm(self, ct: Path, mode: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        labels: dict[bool, np.ndarray] = {}
        for on_device in (True, False):
            self.one_image(ct, mode, on_device)  # warm-up: model load, cuDNN autotuning
            self._reset_peak()
            runs = [self.one_image(ct, mode, on_device) for _ in range(self.args.repeat)]
            best = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            labels[on_device] = best[2]
            key = "resample_on_device" if on_device else "resample_on_cpu"
            result[key] = {
                "median_s": round(best[0], 3),
                "all_s": [round(r[0], 3) for r in runs],
                "stages_s": {k: round(v, 3) for k, v in best[1].items()},
                "peak_gpu_allocated_mib": self._peak_mib(),
            }
        result["device_vs_cpu_resampling_voxels_differ"] = int((labels[True] != labels[False]).sum())
        return result

    def bare_windows(self, ct: Path, mode: str, tiles: list[int] | None = None) -> dict[str, Any]:
        """nnU-Net's sliding window alone per model; with --tiles, the batched window too."""
        from raytseg.pipeline.load import load_volume
        from raytseg.pipeline.passes import prepare

        step, models, plans = self.models(mode)
        prepared = prepare(load_volume(ct, self.limits), step, plans, None)
        seconds: dict[str, float] = {}
        changed: dict[str, int] = {}
        for item in prepared.inputs:
            found = self._windows(
                models[item.model_key]._predictor, item, self.args.tiles if tiles is None else tiles
            )
            for name, (t, n) in found.items():
                seconds[name] = seconds.get(name, 0.0) + t
                changed[name] = changed.get(name, 0) + n
        return {
            "total_s": round(seconds.pop("nnunet"), 3),
            "tiles_s": {k: round(v, 3) for k, v in seconds.items()},
            "tiles_argmax_voxels_changed": {k: v for k, v in changed.items() if k != "nnunet"},
            "voxels": int(sum(np.prod(i.data.shape[1:]) for i in prepared.inputs)),
        }

    def _windows(self, predictor: Any, item: Any, tiles: list[int]) -> dict[str, tuple[float, int]]:
        import torch

        from raytseg.pipeline import sliding_window

        predictor.tile_step_size = item.step_size
        data = torch.from_numpy(item.data)
        with torch.inference_mode():
            ref, seconds = self._timed_twice(lambda: predictor.predict_sliding_window_return_logits(data))
            labels = ref.argmax(0)
            found = {"nnunet": (seconds, 0)}
            batched = sliding_window.predict_logits_on_device
            for k in tiles:
                out, t = self._timed_twice(lambda k=k: batched(predictor, data, k))
                found[f"tiles_{k}"] = (t, int((out.argmax(0) != labels).sum()))
        return found

    def autotune_effect(self, ct: Path, mode: str) -> dict[str, Any]:
        """Bare windows and the warm image with cuDNN autotuning off (raytseg's default) and on."""
        import torch

        result = {}
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            windows = self.bare_windows(ct, mode, tiles=[])
            result[f"autotune_{'on' if autotune else 'off'}"] = {"windows_s": windows["total_s"]}
        torch.backends.cudnn.benchmark = False
        return result

    def _timed_twice(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """The second of two calls (the first loads kernels and autotunes), synchronised."""
        fn()
        self._sync()
        started = time.perf_counter()
        out = fn()
        self._sync()
        return out, time.perf_counter() - started

    def tiles_end_to_end(self, ct: Path, mode: str) -> dict[str, Any]:
        """Labels with several tiles per pass against nnU-Net's loop, per-class Dice."""
        _, models, _ = self.models(mode)
        _, _, reference = self.one_image(ct, mode, True)
        result: dict[str, Any] = {}
        for k in self.args.tiles:
            for model in models.values():
                model.tiles_per_pass = k
            try:
                wall, stages, labels = self.one_image(ct, mode, True)
            finally:
                for model in models.values():
                    model.tiles_per_pass = None
            result[f"tiles_{k}"] = {
                "wall_s": round(wall, 3),
                "model_s": round(stages["model"], 3),
                "min_class_dice_vs_nnunet_loop": round(_min_dice(labels, reference), 6),
                "voxels_differ": int((labels != reference).sum()),
            }
        return result

    def profile(self, ct: Path, mode: str, out: Path) -> dict[str, Any]:
        """cProfile of one warm image: where the time outside the networks goes."""
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        wall, stages, _ = self.one_image(ct, mode, True)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        (out / f"profile_{mode}.txt").write_text(text.getvalue())
        return {"wall_s": round(wall, 3), "stages_s": {k: round(v, 3) for k, v in stages.items()}}

    def batch(self, ct: Path, mode: str, sampler: GpuSampler) -> dict[str, Any]:
        """Prepare/finish in threads, networks on this thread: the batch job's overlap."""
        from raytseg.pipeline.load import load_volume
        from raytseg.pipeline.passes import finish, prepare

        step, models, plans = self.models(mode)
        device = self.device if self.device.type == "cuda" else None
        source = load_volume(ct, self.limits)
        model_s = 0.0

        def prepared(k: int) -> tuple[Any, Any]:
            volume = _shifted(source, k)
            return volume, prepare(volume, step, plans, None, device=device)

        with ThreadPoolExecutor(self.args.workers) as pool:
            started = time.perf_counter()
            pending = [pool.submit(prepared, k) for k in range(self.args.batch)]
            finished: list[Future[Any]] = []
            for future in pending:
                volume, prep = future.result()
                t0 = time.perf_counter()
                outputs = [models[i.model_key].predict(i) for i in prep.inputs]
                model_s += time.perf_counter() - t0
                done = pool.submit(finish, volume, step, prep, outputs, None, device=device)
                finished.append(done)
            for future in finished:
                future.result()
            stop = time.perf_counter()
        wall = stop - started
        return {
            "images": self.args.batch,
            "wall_s": round(wall, 2),
            "images_per_hour": round(3600 * self.args.batch / wall, 1),
            "gpu_busy_share": sampler.busy_share(started, stop),
            "model_stage_share": round(model_s / wall, 3),
        }

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _peak_mib(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.device.type == "cuda" else None


def _min_dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label:
            x, y = a == label, b == label
            scores.append(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(min(scores, default=1.0))


def _shifted(volume: Any, k: int) -> Any:
    from dataclasses import replace

    return replace(volume, data=(volume.data.astype(np.int32) + k).astype(volume.data.dtype))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - started


def cli_pair(report: Report, ct: Path, mode: str, args: argparse.Namespace) -> None:
    """Cold TotalSegmentator and raytseg CLI runs of one mode, and their Dice."""
    ours, theirs = args.work / f"raytseg_{mode}.nii.gz", args.work / f"totalsegmentator_{mode}.nii.gz"
    report.step(f"cli_raytseg_{mode}", lambda: cold_cli("raytseg", ct, ours, mode, args))
    if not args.skip_ts:
        report.step(f"cli_totalsegmentator_{mode}", lambda: cold_cli("ts", ct, theirs, mode, args))
        if theirs.exists() and theirs.stat().st_size < 15 * 2**20:  # kept for a later run's --ts-reference
            shutil.copy(theirs, args.out / theirs.name)
    elif args.ts_reference is not None:
        theirs = args.ts_reference / theirs.name
    if ours.exists() and theirs.exists():
        report.step(f"dice_{mode}", lambda: compare(ours, theirs))


def run_all(report: Report, ct: Path, args: argparse.Namespace) -> None:
    """Cheap cold runs first, then the in-process figures of the batch mode (the ones the
    targets name), then the expensive cold runs, then the rest: a run cut short by its
    deadline loses the least."""
    main_mode = args.batch_mode
    others = [m for m in args.modes if m != main_mode]
    for mode in others:
        cli_pair(report, ct, mode, args)
    warm = report.step("warm_setup", lambda: Warm(args))
    if warm is not None:
        report.step(f"warm_{main_mode}", lambda: warm.warm(ct, main_mode))
        report.step(f"bare_windows_{main_mode}", lambda: warm.bare_windows(ct, main_mode))
        if args.tiles:
            report.step(f"tiles_end_to_end_{main_mode}", lambda: warm.tiles_end_to_end(ct, main_mode))
        report.step(f"profile_{main_mode}", lambda: warm.profile(ct, main_mode, args.out))
        sampler = GpuSampler()
        with sampler.running():
            report.step(f"batch_{main_mode}", lambda: warm.batch(ct, main_mode, sampler))
    if main_mode in args.modes:
        cli_pair(report, ct, main_mode, args)
    for mode in others if warm is not None else []:
        report.step(f"warm_{mode}", lambda m=mode: warm.warm(ct, m))
        report.step(f"bare_windows_{mode}", lambda m=mode: warm.bare_windows(ct, m))


def run_parity(report: Report, ct: Path, args: argparse.Namespace) -> None:
    """Same kernels, same masks: raytseg and TotalSegmentator with cuDNN autotuning off, and
    how far TotalSegmentator's own autotuned output (``--ts-reference``) moves from that."""
    mode = args.batch_mode
    work = args.work
    ours_off, ours_on = work / f"raytseg_{mode}_off.nii.gz", work / f"raytseg_{mode}_on.nii.gz"
    theirs_off = work / f"totalsegmentator_{mode}_off.nii.gz"
    reference = None if args.ts_reference is None else args.ts_reference / f"totalsegmentator_{mode}.nii.gz"
    profile = args.out / f"profile_cold_{mode}.txt"
    report.step(
        f"cli_raytseg_{mode}_off", lambda: cold_cli("raytseg", ct, ours_off, mode, args, profile=profile)
    )
    report.step(
        f"cli_totalsegmentator_{mode}_off", lambda: cold_cli("ts", ct, theirs_off, mode, args, autotune=False)
    )
    pairs = {"raytseg_off_vs_ts_off": (ours_off, theirs_off)}
    if reference is not None:
        pairs["ts_off_vs_ts_autotuned_run1"] = (theirs_off, reference)
        pairs["raytseg_off_vs_ts_autotuned_run1"] = (ours_off, reference)
    for name, (a, b) in pairs.items():
        if a.exists() and b.exists():
            report.step(f"dice_{name}", lambda a=a, b=b: compare(a, b))
    warm = report.step("warm_setup", lambda: Warm(args))
    if warm is not None:
        report.step(f"autotune_effect_{mode}", lambda: warm.autotune_effect(ct, mode))
        report.step(f"warm_{mode}", lambda: warm.warm(ct, mode))
        sampler = GpuSampler()
        with sampler.running():
            report.step(f"batch_{mode}", lambda: warm.batch(ct, mode, sampler))
    report.step(f"cli_raytseg_{mode}_on", lambda: cold_cli("raytseg", ct, ours_on, mode, args, autotune=True))
    if reference is not None and ours_on.exists():
        report.step("dice_raytseg_on_vs_ts_autotuned_run1", lambda: compare(ours_on, reference))


def parse_args() -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="where gpu_bench.json goes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/raytseg-gpu-bench"))
    parser.add_argument("--ct-source", type=Path, default=None, help="example_ct.nii.gz to enlarge")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (CPU rehearsal)")
    parser.add_argument("--modes", nargs="+", default=["fast", "total"], choices=list(MODES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-mode", default="total", choices=list(MODES))
    parser.add_argument("--workers", type=int, default=4, help="threads preparing/finishing in the batch")
    parser.add_argument("--skip-ts", action="store_true")
    parser.add_argument("--parity", action="store_true", help="the autotuning/parity run instead")
    parser.add_argument("--ts-reference", type=Path, help="with --skip-ts: an earlier run's TS outputs")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip steps that would start later")
    parser.add_argument("--tiles", type=int, nargs="*", default=[2, 4], help="tiles per pass to compare")
    parser.add_argument("--ts-python", default=sys.executable, help="interpreter with TotalSegmentator")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.weights = args.work / "weights"
    args.ts_python = str(Path(args.ts_python).absolute())
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)  # core_bench's folder
    report = Report(args.out / "gpu_bench.json", args.deadline_s)
    report.data["args"] = {k: str(v) for k, v in vars(args).items()}
    report.step("environment", lambda: environment(args.device))
    source = {"source": args.ct_source} if args.ct_source else {}
    ct = report.step("make_ct", lambda: str(make(args.work / "realistic_ct.nii.gz", **source)))
    report.step("synth_weights", lambda: synth_weights(args.weights, args.tiny))
    if ct is None:
        raise SystemExit("no benchmark CT; see the report")
    ct_path = Path(ct)
    report.data["ct_shape"] = list(nib.load(ct_path).shape)
    (run_parity if args.parity else run_all)(report, ct_path, args)
    failed = [name for name, step in report.data["steps"].items() if not step["ok"]]
    report.data["failed_steps"] = failed
    report.save()
    print(f"done; failed steps: {failed or 'none'}", flush=True)


if __name__ == "__main__":
    main()
