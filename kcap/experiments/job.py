"""One run of a sweep as a picklable job: train (or resume), then the post-steps, then write
the run's row of the results table.

A sweep folder holds
  sweep.json                the experiment, preset and grid (a folder holds one sweep)
  runs/<name>/              the training run folder (checkpoints, log.jsonl, report.json)
  post/<name>/<step>/       what post-steps made (a quantized model and its eval.json)
  jobs/<name>/              the job's own files: result.json (its row), failed.json,
                            and the executor's job.pkl and worker.log
  results.jsonl, results.md, figures/

Every step checks what is already on disk first, so running a job again after a kill (or
after it finished) continues it instead of starting over.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kcap.atomic import write_json
from kcap.experiments.spec import PostStep, Run


def config_record(config) -> dict:
    """A TrainConfig as its JSON files hold it (tuples become lists), for comparisons."""
    return json.loads(json.dumps(asdict(config)))


@dataclass
class RunJob:
    run: Run
    sweep: Path
    experiment: str
    preset: str

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def folder(self) -> Path:
        return Path(self.sweep) / "jobs" / self.run.name

    @property
    def run_dir(self) -> Path:
        return Path(self.sweep) / "runs" / self.run.name

    def result(self) -> dict | None:
        """The finished row of this run, if it is on disk and belongs to this config."""
        try:
            row = json.loads((self.folder / "result.json").read_text())
        except (OSError, ValueError):
            return None
        return row if row.get("config") == config_record(self.run.config) else None

    def __call__(self) -> dict:
        return execute(self)


def execute(job: RunJob) -> dict:
    """Train (or resume) the run, do its post-steps, write and return its row."""
    from kcap.experiments.results import row_from_report

    done = job.result()
    if done is not None:
        return done
    start = time.perf_counter()
    report = _trained(job)
    post = {step.name: _post_step(job, step) for step in job.run.post}
    row = row_from_report(job, report, post)
    row["wall_s"] = time.perf_counter() - start  # the attempt that finished it
    write_json(job.folder / "result.json", row)
    (job.folder / "failed.json").unlink(missing_ok=True)
    return row


def _trained(job: RunJob) -> dict:
    from kcap.train import train

    try:  # report.json is written once training and its final evaluation are done
        return json.loads((job.run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return train(job.run.config, job.run_dir, resume=True, progress=False)


def _post_step(job: RunJob, step: PostStep) -> dict:
    """Do post-step ``step`` on the trained run (once: its eval.json is the result)."""
    out = Path(job.sweep) / "post" / job.run.name / step.name
    try:
        return json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        pass
    if step.kind == "qa":
        return _qa(job, step, out)
    if out.exists():  # an attempt killed half-way: the folder is ours, start it again
        shutil.rmtree(out)
    return _quantize(job, step, out)


def _device(job: RunJob) -> str:
    return "cpu" if job.run.config.device == "cpu" else "auto"


def _qa(job: RunJob, step: PostStep, out: Path) -> dict:
    """The QA extraction test of the trained run (``kcap qa``: its fine-tune resumes in the
    run folder), reported as extractable bits."""
    from kcap.qa.finetune import QAConfig, run_qa

    opts = dict(step.options)
    if "where" in opts:
        opts["where"] = tuple(opts["where"])
    elif _moe(job.run.config):
        opts["where"] = ("q", "v")  # MoE experts are stacked tensors: no LoRA on them
    report = run_qa(job.run_dir, QAConfig(**opts, test_people=job.run.config.eval_sample),
                    device=_device(job), progress=False)
    n_params = report["extractable"]["n_params"]
    result = {"bits": report["extractable_bits"], "R": report["R_extractable"],
              "R_ci95": report["extractable_bits_ci95"] / n_params, "stored_bits": None,
              "knowledge_bits_same_people": report["stored_bits"],
              "exact_match": report["exact_match"], "exact_match_ci95": report["exact_match_ci95"]}
    write_json(out / "eval.json", result)
    return result


def _moe(cfg) -> bool:
    """Whether the run's model has MoE experts (its config, built without weights)."""
    from kcap.models import model_config

    return bool(model_config(cfg.model, 1, context=cfg.window, **cfg.model_options).n_experts)


def _quantize(job: RunJob, step: PostStep, out: Path) -> dict:
    """Quantize the trained run and measure it again on the same people."""
    from kcap.evaluate_checkpoint import evaluate_checkpoint
    from kcap.quantize_run import quantize_run

    opts = step.options
    quantize_run(job.run_dir, out, bits=opts.get("bits", 8), method=opts.get("method", "rtn"),
                 group_size=opts.get("group_size", 64))
    # the same people as the run's own final evaluation (same sample size, same seed)
    report, info = evaluate_checkpoint(out, sample=job.run.config.eval_sample, device=_device(job))
    result = {"bits": report.bits, "R": report.R, "R_ci95": report.R_ci95,
              "stored_bits": info.get("stored_bits"), "method": opts.get("method"),
              "bits_per_weight": opts.get("bits")}
    write_json(out / "eval.json", result)
    return result
