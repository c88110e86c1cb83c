"""Batch processing: a manifest CSV of subjects -> one folder per subject + cohort tables.

Manifest columns: ``subject,t1,fluid,dixon_fat,dixon_water`` plus optional ``fluid_kind``
(t2fs/stir), ``t2fs``/``stir`` (instead of fluid + fluid_kind) and ``labels`` (+ ``label_table``);
other columns are ignored; a row with only the Dixon pair is segmented on a T1-like image made
from it (``pipeline.dixon_input``). Paths are relative to the manifest's folder. The phantom generator's
``cohort.csv`` works as is. Its ``labels`` column (truth) is only used with ``use_labels=True``
(CLI ``--use-labels``): by default the network segments.

Resume: a subject is done when ``OUT/<subject>/measurements.json`` exists and records the same
input sha256 hashes, model (weights sha256 + version, or label-map hash) and measurement
configuration (cut-offs). ``force=True`` redoes all.

Engines (same worker function, so identical results):
  * ``local``: ``concurrent.futures.ProcessPoolExecutor`` (forkserver), the model loaded once per
    worker process. At most ``workers`` subjects are in flight; if a worker process dies (killed,
    out of memory, segfault) the subjects it may have held are retried one at a time, and the
    one that kills its worker again is recorded in errors.csv. Everything else goes on.
  * ``ray``: Ray tasks (``ray`` is optional: ``pip install 'ifi-seg[cluster]'``). A local Ray is
    started with ``num_cpus=workers`` unless ``ray_address`` points at a running cluster (whose
    workers must have ifi-seg importable).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.api import FLUID_KINDS, ROLES, SubjectError, sanitize_subject_id


class ManifestError(ValueError):
    """The manifest itself is unusable (missing columns, duplicate IDs): a usage error."""


@dataclass
class SubjectSpec:
    """One manifest row, paths resolved."""

    subject: str
    inputs: dict = field(default_factory=dict)
    labels: str | None = None
    label_table: str | None = None

    def task(self, out_dir: Path) -> dict:
        """Plain-dict form sent to worker processes."""
        return {"subject": self.subject, "inputs": dict(self.inputs), "labels": self.labels,
                "label_table": self.label_table, "out_dir": str(out_dir / self.subject)}


def read_manifest(path, *, use_labels: bool = False) -> list[SubjectSpec]:
    """Parse a manifest CSV into ``SubjectSpec`` objects (see module docstring).

    Raises ``ManifestError`` for a missing file, no ``subject`` column, no image column, or
    subject IDs that collide after sanitising. Missing image files are NOT checked here: they
    fail that subject only.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "subject" not in columns:
        raise ManifestError(f"{path}: no 'subject' column (columns: {', '.join(columns)})")
    if not {"t1", "fluid", "t2fs", "stir"} & set(columns) and not {"dixon_fat", "dixon_water"} <= set(columns):
        raise ManifestError(f"{path}: needs a 't1' and/or 'fluid' (or 't2fs'/'stir') column, "
                            "or 'dixon_fat' and 'dixon_water' columns")

    def resolve(p: str) -> str | None:
        if not p:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    specs, seen = [], {}
    for n, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        raw = row.get("subject", "")
        try:
            sid = sanitize_subject_id(raw)
        except ValueError as exc:
            raise ManifestError(f"{path} line {n}: {exc}") from exc
        if sid in seen:
            raise ManifestError(f"{path} line {n}: subject ID {raw!r} duplicates line {seen[sid]}")
        seen[sid] = n
        inputs = {k: resolve(row.get(k, "")) for k in (*ROLES, *FLUID_KINDS)}
        inputs = {k: v for k, v in inputs.items() if v}
        if row.get("fluid_kind"):
            inputs["fluid_kind"] = row["fluid_kind"].lower()
        spec = SubjectSpec(sid, inputs)
        if use_labels:
            spec.labels = resolve(row.get("labels", ""))
            spec.label_table = resolve(row.get("label_table", ""))
        specs.append(spec)
    return specs


# ----------------------------------------------------------------------------------------------
# worker side (runs in worker processes; module-level so both engines pickle it by reference)
# ----------------------------------------------------------------------------------------------
_WORKER: dict = {"options": None, "model": None, "model_key": None}


def _init_worker(options: dict) -> None:
    _WORKER["options"] = options
    threads = options.get("threads_per_worker")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)


def _worker_model(options: dict):
    """The model of this worker process, loaded on first use and kept (one load per worker)."""
    key = (options.get("model_path"), options.get("device"))
    if _WORKER["model"] is None or _WORKER["model_key"] != key:
        from pipeline.api import load_model_or_fail

        if options.get("threads_per_worker"):
            import torch

            torch.set_num_threads(int(options["threads_per_worker"]))
        _WORKER["model"] = load_model_or_fail(options.get("model_path"), options.get("device", "auto"))
        _WORKER["model_key"] = key
    return _WORKER["model"]


def process_task(task: dict, options: dict | None = None) -> dict:
    """Run one subject in a worker; never raises (errors come back as a dict)."""
    from pipeline.api import run_subject
    from pipeline.config import MeasureConfig

    options = options or _WORKER["options"] or {}
    t0 = time.perf_counter()
    result = {"subject": task["subject"], "ok": False, "stage": None, "message": None}
    try:
        cfg = options.get("config")
        config = MeasureConfig(**cfg) if isinstance(cfg, dict) else cfg
        stale = Path(task["out_dir"]) / "measurements.json"
        if stale.exists():        # being redone: the old result must not look current
            stale.unlink()
        model = None if task.get("labels") else _worker_model(options)
        run_subject(task["inputs"], task["out_dir"], model=model, config=config, subject=task["subject"],
                    labels_override=task.get("labels"), label_table=task.get("label_table"),
                    write_dicom_seg=options.get("write_dicom_seg", False),
                    include_identifiers=options.get("include_identifiers", False),
                    max_voxels=options.get("max_voxels"), hashes=task.get("hashes"))
        result["ok"] = True
    except SubjectError as exc:
        result.update(stage=exc.stage, message=exc.message)
    except MemoryError:
        result.update(stage="resources", message="out of memory")
    except Exception as exc:   # a bug or an unforeseen input: record it, keep the cohort going
        result.update(stage="internal", message=f"{type(exc).__name__}: {exc}")
    result["seconds"] = time.perf_counter() - t0
    return result


def _ray_process_task(task: dict, options: dict) -> dict:
    return process_task(task, options)


# ----------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------
def is_done(task: dict, model_key: dict | None, config: dict | None = None) -> bool:
    """True when the subject's measurements.json exists and matches the inputs, the model and
    (when given, as JSON) the measurement configuration: changed cut-offs change the flags."""
    from pipeline.report import read_measurements

    rec = read_measurements(Path(task["out_dir"]) / "measurements.json")
    if not rec:
        return False
    prov = rec.get("provenance", {})
    if prov.get("input_sha256") != task.get("hashes"):
        return False
    if config is not None and rec.get("config") != config:
        return False
    model = prov.get("model", {}) or {}
    if task.get("labels"):
        return model.get("source") == "labels"
    return model_key is not None and model.get("sha256") == model_key.get("sha256") \
        and model.get("version") == model_key.get("version")


def _run_local(tasks: list[dict], options: dict, workers: int, on_result, fn=None) -> None:
    """Run ``fn`` (default ``process_task``) over tasks in a process pool, crash-isolated."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # forkserver: workers are forked from a clean server process (never from this one, which may
    # hold threads), and the server imports the pipeline once, so a pool starts in ~0.1 s
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.api", "pipeline.cohort", "pipeline.report", "pipeline.io",
                                "pipeline.measure", "matplotlib.pyplot"])
    queue = list(tasks)
    suspects: list[dict] = []
    while queue or suspects:
        # suspects of an earlier worker crash run alone, so a second crash is attributable
        solo = bool(suspects)
        batch = [suspects.pop(0)] if solo else queue
        n = 1 if solo else max(1, min(workers, len(batch)))
        in_flight: dict = {}
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                 initargs=(options,)) as pool:
            broken = False
            while (batch or in_flight) and not broken:
                while batch and len(in_flight) < n:
                    t = batch.pop(0)
                    in_flight[pool.submit(fn or process_task, t)] = t
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    t = in_flight.pop(fut)
                    try:
                        on_result(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        if solo:
                            on_result({"subject": t["subject"], "ok": False, "stage": "crash",
                                       "message": "worker process died (killed, out of memory or crashed)"})
                        else:
                            suspects.append(t)
                    except Exception as exc:   # e.g. a result that cannot be unpickled
                        on_result({"subject": t["subject"], "ok": False, "stage": "internal",
                                   "message": f"{type(exc).__name__}: {exc}"})
            if broken:
                suspects.extend(in_flight.values())
                in_flight.clear()
        if not solo:
            queue = batch


def _run_ray(tasks: list[dict], options: dict, workers: int, ray_address, on_result) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("engine 'ray' needs the ray package: pip install 'ifi-seg[cluster]'") from exc
    repo_root = str(Path(__file__).resolve().parents[1])
    started_here = not ray.is_initialized()
    if started_here:
        # local workers must import pipeline: put the repository on their path
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs = dict(address=ray_address, include_dashboard=False, log_to_driver=False,
                      ignore_reinit_error=True, logging_level="ERROR")
        if ray_address is None:
            kwargs["num_cpus"] = max(1, workers)
        ray.init(**kwargs)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_process_task)
        opts_ref = ray.put(options)
        refs = {remote.remote(t, opts_ref): t for t in tasks}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                t = refs[ref]
                try:
                    on_result(ray.get(ref))
                except Exception as exc:   # WorkerCrashedError, RayTaskError, ...
                    on_result({"subject": t["subject"], "ok": False, "stage": "crash",
                               "message": f"ray worker failed ({type(exc).__name__}): "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}"})
    finally:
        if started_here:
            ray.shutdown()


def _default_threads(workers: int) -> int:
    """Threads per worker: OMP_NUM_THREADS when the user set it, else the cores shared out."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // workers)


def run_cohort(manifest, out_dir, *, workers: int = 1, engine: str = "local", ray_address=None,
               force: bool = False, quiet: bool = False, config=None, model_path=None,
               device: str = "auto", use_labels: bool = False, write_dicom_seg: bool = False,
               include_identifiers: bool = False, max_voxels: int | None = None,
               threads_per_worker: int | None = None, log=None) -> dict:
    """Process a manifest; write ``OUT/<subject>/...``, ``OUT/cohort.csv``, ``OUT/errors.csv``,
    ``OUT/report.html``.

    Args:
        manifest: CSV path (see module docstring).
        workers: parallel worker processes (local) or Ray CPUs.
        engine: "local" or "ray".
        force: redo subjects even when their results are current.
        config: ``MeasureConfig`` (default cut-offs when None).
        model_path: model bundle (default: the bundled model).
        use_labels: measure the manifest's ``labels`` column instead of segmenting.
        threads_per_worker: torch/OpenMP threads per worker (default: cores // workers).
        log: callable for progress lines (default: print to stderr unless ``quiet``).

    Returns:
        {"subjects", "done", "skipped", "failed", "errors": [{subject, stage, message}], "out_dir"}.

    Raises:
        ManifestError: unusable manifest. SubjectError('model', ...): a subject needs the
        network and the model bundle cannot be found.
    """
    from pipeline.api import input_hashes, model_identity, normalise_inputs
    from pipeline.config import MeasureConfig
    from pipeline.jsonable import to_jsonable
    from pipeline.report import (read_measurements, write_cohort_csv, write_errors_csv,
                                 write_report_html)

    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {engine!r} (local or ray)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or ((lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr)))
    specs = read_manifest(manifest, use_labels=use_labels)
    config = config or MeasureConfig()
    workers = max(1, int(workers))
    errors: list[dict] = []
    tasks, skipped = [], 0
    needs_model = any(not s.labels for s in specs)
    model_key = None
    if needs_model:
        model_key = model_identity(path=model_path)
        if model_key.get("sha256") is None:
            raise SubjectError("model", f"model weights not found ({model_key['file']}); train one or "
                                        "pass --model, or measure given label maps (--use-labels)")
    config_json = json.loads(json.dumps(to_jsonable(config.to_dict())))
    for spec in specs:
        task = spec.task(out_dir)
        try:
            inputs = normalise_inputs(spec.inputs)
            task["inputs"] = {k: str(v) for k, v in inputs.items()}
            task["hashes"] = input_hashes(inputs, spec.labels, spec.label_table)
        except SubjectError as exc:
            errors.append({"subject": spec.subject, "stage": exc.stage, "message": exc.message})
            continue
        if not force and is_done(task, model_key, config_json):
            skipped += 1
            continue
        tasks.append(task)
    say(f"{len(specs)} subjects: {skipped} already done, {len(tasks)} to run, "
        f"{len(errors)} with unusable inputs")

    options = {"config": config.to_dict(), "model_path": None if model_path is None else str(model_path),
               "device": device, "write_dicom_seg": write_dicom_seg,
               "include_identifiers": include_identifiers, "max_voxels": max_voxels,
               "threads_per_worker": threads_per_worker or _default_threads(workers)}
    done = 0
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), disable=quiet or not tasks, unit="subject", file=sys.stderr,
               dynamic_ncols=True)

    def on_result(res: dict) -> None:
        nonlocal done
        if res["ok"]:
            done += 1
        else:
            errors.append({"subject": res["subject"], "stage": res["stage"], "message": res["message"]})
            bar.write(f"FAILED {res['subject']} [{res['stage']}]: {res['message']}", file=sys.stderr)
        bar.update(1)

    try:
        if tasks:
            if engine == "ray":
                _run_ray(tasks, options, workers, ray_address, on_result)
            else:
                _run_local(tasks, options, workers, on_result)
    finally:
        bar.close()

    failed = {e["subject"] for e in errors}
    records = []
    for spec in specs:
        if spec.subject in failed:
            continue
        rec = read_measurements(out_dir / spec.subject / "measurements.json")
        if rec:
            records.append(rec)
    errors.sort(key=lambda e: [s.subject for s in specs].index(e["subject"])
                if e["subject"] in {s.subject for s in specs} else 10**9)
    rows = write_cohort_csv(out_dir / "cohort.csv", records)
    write_errors_csv(out_dir / "errors.csv", errors)
    model_info = model_key if needs_model else {"source": "labels"}
    write_report_html(out_dir / "report.html", out_dir, records, rows, errors, config, model_info=model_info)
    say(f"done: {done} processed, {skipped} skipped (up to date), {len(errors)} failed -> {out_dir}")
    return {"subjects": len(specs), "done": done, "skipped": skipped, "failed": len(errors),
            "errors": errors, "out_dir": str(out_dir)}
