"""Rank 0's tracker: every call journaled first, then sent to MLflow by a background thread.

How runs are tracked, and the calls the trainer makes, are described in tracking/__init__.py.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from cmkd_scale.tracking import plots, sysinfo
from cmkd_scale.tracking.base import Tracker
from cmkd_scale.tracking.journal import Journal, RunState, now_ms
from cmkd_scale.tracking.remote import (
    RemoteRun,
    bound_http,
    column,
    local_artifact_location,
    resolve_uri,
)
from cmkd_scale.tracking.report import Curves, eval_parts, safe_key, write_class_table
from cmkd_scale.tracking.sender import Op, Sender

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value

# The runs-table columns of the experiment's saved view (remote.VIEW_KEY, opened by the links
# the tracker prints), in this order after Run Name and Created: the reported model's eval
# summary, the KD setup, then the data, model and source of the run.
VIEW_COLUMNS = (
    column("metrics", "report/mAP"),
    column("metrics", "report/mAUC"),
    column("metrics", "report/dprime"),
    column("metrics", "report/acc"),
    column("metrics", "report/epoch"),
    column("tags", "student"),
    column("tags", "teacher"),
    column("params", "distill.lambda_"),
    column("params", "distill.temperature"),
    column("params", "effective.global_batch"),
    column("attributes", "Dataset"),
    column("attributes", "Models"),
    column("attributes", "Source"),
)
# data.<split> -> the dataset input's context (MLflow shows it beside the dataset's name)
DATA_CONTEXTS = {"train": "training", "val": "validation", "eval": "evaluation"}
# the module whose _load_pyfunc(path) serves a logged export (cmkd_scale/serve/mlflow_model.py;
# named, not imported: tracking sits below serve)
PYFUNC_LOADER = "cmkd_scale.serve.mlflow_model"
# what a logged model needs besides cmkd_scale itself (pinned to this environment's versions)
MODEL_REQUIREMENTS = ("torch", "torchaudio", "timm", "numpy", "pandas", "soundfile", "av", "soxr")


class MlflowTracker(Tracker):
    """Rank 0's tracker: journal first, then MLflow through a background sender."""

    def __init__(self, cfg: Any, *, run_dir: Path, resume_run_id: str | None = None) -> None:
        self.cfg = cfg
        tcfg = cfg.tracking
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(tcfg.uri, self.run_dir)
        bound_http(tcfg.request_timeout_s, tcfg.max_retries)
        self.journal = Journal(self.run_dir)
        self.state = RunState(self.run_dir)
        resuming = bool(resume_run_id) and self.state.knows(resume_run_id or "")
        name = cfg.run.name or self.run_dir.name
        if not resuming:
            moved = self.journal.rotate()
            if moved:
                log.info("a new run in %s: the previous journal is now %s", self.run_dir, moved)
            self.state.reset(experiment=tcfg.experiment, name=name, uri=self.uri)
        self.journal.write("start", uri=self.uri, resume_run_id=resume_run_id, name=name)
        self._finished = False
        self._lock = threading.Lock()
        self._curves = Curves()
        self._maps: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._best: dict[str, float] = {}
        self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
        self._plot_jobs: dict[Path, tuple[Any, tuple, dict]] = {}
        self._renamed: set[str] = set()
        self._warned_full = False
        self.max_enqueue_s = 0.0  # longest time a logging call spent (tests, diagnostics)

        self.remote = RemoteRun(
            self.uri, health_timeout_s=tcfg.request_timeout_s, view_columns=VIEW_COLUMNS
        )
        self._resume_id = resume_run_id if resume_run_id and not resuming else None
        self._resume_id = self._resume_id or self.state.remote_id(self.uri)
        self.sender = Sender(
            self.remote,
            self._open_remote,
            journal_hint=str(self.journal.path),
            flush_every_s=tcfg.flush_every_s,
        )
        try:  # connect now (bounded by the HTTP limits) so run_id is MLflow's when possible
            if not self.remote.reachable():
                raise ConnectionError(f"no answer from {self.uri}/health")
            self._open_remote()
        except Exception as exc:
            log.warning(
                "MLflow at %s is unreachable (%s). Training goes on; everything is kept in %s, "
                "sent when the server answers, or by `python -m cmkd_scale.tracking upload "
                "--run-dir %s`.",
                self.uri,
                str(exc).splitlines()[0][:300],
                self.journal.path,
                self.run_dir,
            )
            self.sender.mark_offline()
        self.sender.start()
        atexit.register(self._at_exit)
        self._record_run_context()
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        if tcfg.system_metrics:
            self._monitor = threading.Thread(
                target=self._sample_system,
                args=(tcfg.system_metrics_interval_s,),
                name="system-metrics",
                daemon=True,
            )
            self._monitor.start()

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        """MLflow's run id once the run exists on the server, else the local id (both resume)."""
        return self.state.remote_id(self.uri) or self.state.local_id

    # -- setup

    def _open_remote(self) -> None:
        artifact_location = local_artifact_location(self.uri)
        run_id = self.remote.open(
            experiment=self.cfg.tracking.experiment,
            name=self.cfg.run.name or self.run_dir.name,
            resume_id=self._resume_id,
            artifact_location=artifact_location,
        )
        self.state.set_remote(self.uri, run_id)
        log.info("MLflow run %s at %s", run_id, self.remote.ui_url())
        log.info("MLflow runs table: %s", self.remote.experiment_url())

    def _record_run_context(self) -> None:
        """Tags, resolved config and data manifest summaries every run carries."""
        tags = sysinfo.run_tags(self.cfg)
        tags.update({"cmkd.local_id": self.state.local_id or "", "cmkd.run_dir": str(self.run_dir)})
        tags.update(sysinfo.source_tags(tags["git_commit"]))  # the UI's Source column
        if self.cfg.tracking.parent_run_id:  # nested under a study's parent run
            tags["mlflow.parentRunId"] = self.cfg.tracking.parent_run_id
        self.set_tags(tags)
        self.log_text(self.cfg.to_yaml(), "config.yaml")
        datasets = []
        for split, context in DATA_CONTEXTS.items():
            location = getattr(self.cfg.data, split, "")
            summary = (
                sysinfo.manifest_summary(sysinfo.manifest_path(location)) if location else None
            )
            if summary is not None:
                self.log_dict(summary, f"data/{split}_manifest_summary.json")
                sha = tags.get(f"data.{split}.sha256", "unavailable")
                record = sysinfo.dataset_record(location, summary, sha, context)
                key = (record["source"], sha)
                same = [d for d in datasets if (d["source"], d["digest"]) == key]
                if same:  # one set in two roles (val = eval): MLflow keeps one input per set
                    same[0]["context"] += f", {context}"
                else:
                    datasets.append(record)
        if datasets:
            self.log_datasets(datasets)

    # -- the Tracker interface

    def _submit(self, op: Op) -> None:
        if not self.sender.submit(op) and not self._warned_full:
            self._warned_full = True
            log.warning("MLflow queue full: records are kept in %s only", self.journal.path)

    def log_params(self, params: dict[str, Any]) -> None:
        start = time.perf_counter()
        values = {}
        for key, value in self._safe(params).items():
            text = str(value)
            if len(text) > _MAX_PARAM_CHARS:
                log.warning(
                    "param %s is %d chars; MLflow keeps %d", key, len(text), _MAX_PARAM_CHARS
                )
                text = text[:_MAX_PARAM_CHARS]
            values[key] = text
        self.journal.write("params", params=values)
        self._submit(("params", values))
        self._timed(start)

    def set_tags(self, tags: dict[str, Any]) -> None:
        start = time.perf_counter()
        values = {k: str(v) for k, v in self._safe(tags).items()}
        self.journal.write("tags", tags=values)
        self._submit(("tags", values))
        self._timed(start)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        start = time.perf_counter()
        ts = now_ms()
        values = {k: float(v) for k, v in self._safe(metrics).items()}
        self.journal.write("metrics", ts=ts, step=int(step), values=values)
        for key, value in values.items():
            group = key.split("/", 1)[0] if "/" in key else ""
            if group != "system" and group not in self._best:  # evals have their own plots
                self._curves.add(key, step, value)
        self._submit(("metrics", [(k, v, ts, int(step)) for k, v in values.items()]))
        self._timed(start)

    def log_eval(
        self,
        stats: Any,
        step: int,
        epoch: int,
        class_names: Sequence[str],
        prefix: str = "eval",
    ) -> None:
        summary, ap, auc = eval_parts(stats)
        best = max(self._best.get(prefix, -math.inf), summary["mAP"])
        self._best[prefix] = best
        self._maps[prefix].append((epoch, summary["mAP"]))
        metrics = {f"{prefix}/{k}": v for k, v in summary.items()}
        self.log_metrics({**metrics, f"{prefix}/best_mAP": best, f"{prefix}/epoch": epoch}, step)
        if ap is None:
            return
        if len(ap) != len(class_names):
            raise ValueError(
                f"log_eval: {len(ap)} per-class APs but {len(class_names)} class names; pass the "
                "class names of the eval manifest"
            )
        table = (
            self.journal.artifacts / "eval" / f"{prefix}_class_ap_epoch{epoch:03d}_step{step}.csv"
        )
        write_class_table(table, class_names, ap, auc)
        self.log_artifact(table, "eval")
        self._plot_later(
            self.journal.artifacts / "plots" / f"{prefix}_class_ap_epoch{epoch:03d}.png",
            plots.class_ap_extremes,
            ap,
            list(class_names),
            title=f"{prefix} epoch {epoch}",
        )
        self._plot_run()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            log.warning("artifact %s does not exist; not logged", path)
            return
        self.journal.write("artifact", path=str(path), artifact_path=artifact_path)
        self._submit(("artifact", (str(path), artifact_path)))

    def log_text(self, text: str, artifact_file: str) -> None:
        local = self.journal.artifacts / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text, encoding="utf-8")
        self.log_artifact(local, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if artifact_file.endswith(".json"):
            text = json.dumps(obj, indent=2, default=str) + "\n"
        else:
            text = yaml.safe_dump(obj, sort_keys=False)
        self.log_text(text, artifact_file)

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """MLflow dataset inputs (``sysinfo.dataset_record`` dicts)."""
        self.journal.write("inputs", datasets=datasets)
        self._submit(("inputs", datasets))

    def log_model(self, path: str | Path, *, register: str = "") -> None:
        path = Path(path).resolve()
        if not self.cfg.tracking.log_model:
            return
        if not path.is_file():
            log.warning("model %s does not exist; not logged", path)
            return
        spec = {
            "name": "model",
            "path": str(path),
            "loader_module": PYFUNC_LOADER,
            "register": register,
            "pip_requirements": sysinfo.pinned(MODEL_REQUIREMENTS),
            "tags": {"checkpoint": path.name, "student": sysinfo.student_name(self.cfg)},
        }
        self.journal.write("model", spec=spec)
        self._submit(("model", spec))

    def log_checkpoint(self, path: str | Path) -> None:
        path = Path(path).resolve()
        self.set_tags({"checkpoint_path": str(path)})
        if self.cfg.tracking.log_checkpoint:
            self.log_artifact(path, "checkpoint")

    def finish(self, status: str = "FINISHED", note: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"finish(status={status!r}): use one of {STATUSES}")
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._monitor_stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if note:
            tag = {"KILLED": "resume_point", "FAILED": "failure"}.get(status, "end_note")
            self.set_tags({tag: note})
        self._plot_run()
        self._plotter.shutdown(wait=True)
        end = now_ms()
        self.journal.write("status", status=status, note=note, end_ms=end)
        self._submit(("status", (status, end)))
        complete = self.sender.stop(self.cfg.tracking.finish_timeout_s)
        self.journal.close()
        log.info("longest tracker call on the training thread: %.1f ms", 1e3 * self.max_enqueue_s)
        if complete:
            log.info("MLflow run %s %s: %s", self.run_id, status, self.remote.ui_url())
        else:
            log.warning(
                "MLflow run %s ended %s but the server did not get everything; the run directory "
                "has it all: send it with `python -m cmkd_scale.tracking upload --run-dir %s`",
                self.run_id,
                status,
                self.run_dir,
            )

    # -- helpers

    def _safe(self, items: dict[str, Any]) -> dict[str, Any]:
        """Rename keys MLflow would refuse (warned once per key)."""
        out = {}
        for key, value in items.items():
            clean = safe_key(key)
            if clean != key and key not in self._renamed:
                self._renamed.add(key)
                log.warning("MLflow refuses the name %r: logged as %r", key, clean)
            out[clean] = value
        return out

    def _timed(self, start: float) -> None:
        self.max_enqueue_s = max(self.max_enqueue_s, time.perf_counter() - start)

    def _plot_later(self, out: Path, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Render on the plot thread (a PNG costs ~0.5 s of CPU, not the training thread's);
        a request for a file still waiting replaces the older one."""
        with self._lock:
            waiting = out in self._plot_jobs
            self._plot_jobs[out] = (fn, args, kwargs)
        if not waiting:
            try:
                self._plotter.submit(self._plot, out)
            except RuntimeError:  # the interpreter is shutting down (atexit): render here
                self._plot(out)

    def _plot(self, out: Path) -> None:
        """Render the latest request for ``out`` and log it; errors are logged, never raised."""
        with self._lock:
            fn, args, kwargs = self._plot_jobs.pop(out)
        try:
            fn(*args, out=out, **kwargs)
        except Exception as exc:
            log.warning("plot %s failed: %s", out.name, exc)
            return
        self.log_artifact(out, "plots")

    def _plot_run(self) -> None:
        out = self.journal.artifacts / "plots"
        curves = {k: list(v) for k, v in self._curves.series.items()}  # snapshots
        maps = {k: list(v) for k, v in self._maps.items()}
        if curves:
            self._plot_later(out / "training_curves.png", plots.training_curves, curves)
        if maps:
            self._plot_later(out / "map_per_epoch.png", plots.map_per_epoch, maps)

    def _sample_system(self, interval_s: float) -> None:
        sampler = sysinfo.SystemSampler()
        step = 0
        try:
            while not self._monitor_stop.wait(interval_s):
                self.log_metrics(sampler.sample(), step)
                step += 1
        except Exception as exc:  # the monitor must never take training down
            log.warning("system metrics stopped: %s", exc)
        finally:
            sampler.close()

    def _at_exit(self) -> None:
        if not self._finished:
            self.finish("FAILED", note="process exited without calling Tracker.finish()")
