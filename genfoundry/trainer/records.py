"""What a run records as it trains, on rank 0: metrics.jsonl and TensorBoard, events (resume,
rollback, checkpoint), and report.html rebuilt while it runs. `Trainer` takes these methods from
`TrainerRecords`; they use the attributes `Trainer.__init__` sets (cfg, run_dir, rank, step,
checkpoints, print)."""

from __future__ import annotations

import os

from genfoundry import accel, metrics
from genfoundry.distributed import parallel
from genfoundry.errors import GenfoundryError


class TrainerRecords:
    """The records of a run for `Trainer` (a split of one class along the training / recording seam)."""

    def open_sinks(self) -> None:
        """metrics.jsonl and TensorBoard event files (rank 0), the console line, and the run's totals of
        restarts and rollbacks so far (from the records of earlier attempts)."""
        tc = self.cfg.train
        self.console = metrics.ConsoleSink(tc.steps, self.print)
        self.jsonl = self.tensorboard = self._report_process = None
        self._logged_checkpoints: set[int] = set()
        self.restarts = self.rollbacks = 0
        if self.rank != 0:
            return
        self.jsonl = metrics.JsonlSink(self.run_dir / "metrics.jsonl")  # a line torn by a crash is cut off
        if self.jsonl.path.exists():
            try:
                events = [row.get("event") for row in metrics.read_jsonl(self.jsonl.path, all_rows=True)]
                self.restarts, self.rollbacks = events.count("resume"), events.count("rollback")
            except metrics.MetricsError as e:  # counted from here on; training does not depend on it
                self.print(f"warning: the totals of restarts and rollbacks start again at 0: {e}")
        from genfoundry.report.assets import AssetError, uplot

        self._live_report = bool(tc.report_every)
        try:
            uplot()
        except AssetError as e:
            self._live_report = False
            self.print(f"note: no report.html for this run: {e}")
        if tc.tensorboard:
            try:
                self.tensorboard = metrics.TensorBoardSink(self.run_dir, purge_step=self.step + 1 if self.step else None)
            except ImportError:
                self.print("note: the tensorboard package is not installed, so this run writes no TensorBoard "
                           "event files (pip install tensorboard; train.tensorboard=false silences this)")
            else:
                config_text = (self.run_dir / "config.toml").read_text()
                self.tensorboard.text("config", "\n".join("    " + line for line in config_text.splitlines()))

    def log_event(self, name: str, step: int, values: dict) -> None:
        """Something the run did (resume, rollback, checkpoint), in metrics.jsonl and TensorBoard."""
        if name == "resume":
            self.restarts += 1
        elif name == "rollback":
            self.rollbacks += 1
        if self.jsonl:
            self.jsonl.event(name, step, values)
        if self.tensorboard:  # under events/: a checkpoint's stall_s is not the interval's checkpoint/stall_s
            self.tensorboard.event(f"events/{name}", step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def log_checkpoints(self, finished: bool = False) -> None:
        """A checkpoint event once a save is durable (its stall and time to durable), or, when `finished`,
        for every save that never became durable (its failure was warned about)."""
        for i, record in enumerate(self.checkpoints.records):
            if i not in self._logged_checkpoints and (record["durable_s"] is not None or finished):
                self._logged_checkpoints.add(i)
                self.log_event("checkpoint", record["step"], {**record, "failed": record["durable_s"] is None})

    def refresh_report(self, final: bool = False) -> None:
        """Rebuilds RUN/report.html on rank 0. During training in a separate, low-priority process
        (`genfoundry report`, which imports no torch), so reading a long metrics.jsonl never holds this
        process's interpreter lock; skipped while the previous rebuild still runs. At the end, here.
        A page that cannot be written is a warning; training goes on."""
        if self.rank != 0 or (not final and not self._live_report):
            return
        if self._report_process is not None:
            process, log = self._report_process
            if process.poll() is None and not final:
                return
            process.wait()
            log.seek(0)
            why = log.read().decode(errors="replace").strip().splitlines()
            log.close()
            self._report_process = None
            if process.returncode:
                self.print(f"warning: the report of {self.run_dir} was not rebuilt: {why[-1] if why else 'failed'}")
        if not final:
            import subprocess
            import sys
            import tempfile

            log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child never blocks
            process = subprocess.Popen([sys.executable, "-m", "genfoundry", "report", str(self.run_dir)],
                                       stdout=subprocess.DEVNULL, stderr=log)
            try:
                os.setpriority(os.PRIO_PROCESS, process.pid, 10)  # behind training for the cores
            except (AttributeError, OSError):
                pass
            self._report_process = (process, log)
            return
        from genfoundry.report import build_report

        try:
            build_report([self.run_dir])
        except (GenfoundryError, OSError) as e:
            self.print(f"warning: the report of {self.run_dir} was not written: {e}")
            return
        self.print(f"report: {self.run_dir / 'report.html'} (genfoundry report {self.run_dir} rebuilds it)")

    def describe(self) -> None:
        m, ds, tc = self.net, self.data, self.cfg.train
        params = sum(p.numel() for p in self.ema.parameters())
        auto = " (train.precision=auto)" if tc.precision == "auto" else ""
        self.print(f"run {self.run_dir}  device {self.device} ({accel.device_name(self.device)})  "
                   f"precision {self.precision}{auto}")
        self.print(f"global batch {tc.global_batch_size} = micro-batch {self.micro_batch} x accumulation "
                   f"{self.accumulation} x {self.world} rank(s)  parallel "
                   f"{parallel.resolve_strategy(self.cfg.parallel.strategy, self.world)}")
        self.print(f"data {ds.name}: {ds.resolution}x{ds.resolution}x{ds.channels} images, "
                   f"{ds.num_classes} classes   model {self.cfg.model.preset}: {params / 1e6:.2f}M params, "
                   f"{m.flops_per_forward() / 1e9:.3f} GFLOP/forward/image")
        for note in ds.notes:
            self.print(f"data: {note}")
        if self.teacher_meta is not None:
            sc = self.cfg.sample
            self.print(f"distill: from {self.cfg.distill.teacher} ({self.teacher_meta['weights']} weights of step "
                       f"{self.teacher_meta.get('step')}), folding in guidance cfg_scale {sc.cfg_scale:g} "
                       f"({sc.guidance_schedule}, t in [{sc.guidance_min_t:g}, {sc.guidance_max_t:g}])")
