"""Stage `vd batch`: every stage over the clips of a manifest, on local workers or Ray actors.

manifest (read and check the manifest) -> resume (what to redo, from each stage's own `is_current`) ->
worker (one clip, stage by stage) -> engines (where workers run: threads, or Ray actors with their
resources, fault tolerance and forwarded settings) -> report (status lines, the batch report) -> run
(the driver).
"""

from stages.batch.engines import (DEFAULT_THREADS, ENGINES, FORWARD_ENV, SCHEDULE_TIMEOUT, Engine, EngineOptions,
                                  LocalEngine, RayEngine, actor_env, default_gpus, start_engine)
from stages.batch.manifest import ClipPlan, Manifest, load_manifest
from stages.batch.report import build_report, compare_table
from stages.batch.resume import invert_action
from stages.batch.run import BatchOptions, check_options, run_batch
from stages.batch.worker import STAGES, Job, Worker

__all__ = [
    "DEFAULT_THREADS", "ENGINES", "FORWARD_ENV", "SCHEDULE_TIMEOUT", "STAGES", "BatchOptions", "ClipPlan", "Engine",
    "EngineOptions", "Job", "LocalEngine", "Manifest", "RayEngine", "Worker", "actor_env", "build_report",
    "check_options", "compare_table", "default_gpus", "invert_action", "load_manifest", "run_batch", "start_engine",
]
