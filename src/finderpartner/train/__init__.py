"""Training: the recipe (``recipe.train``) and the parts only it uses.

``recipe`` reads in the order of ``train()``; ``step`` (one optimizer step, gradient accumulation), ``probe`` (the
micro-batch that fits), ``budget`` (how many steps a time budget buys), ``checkpoint`` and ``rundir`` (the run
folder, resuming), ``tracking`` (metrics to JSONL / TensorBoard / W&B / Accelerate trackers), ``retrieval_grid``
(the images TensorBoard shows), ``card`` (the model card), ``launch`` (Accelerate and launcher checks), ``levers``
(freezing, LoRA, gradient checkpointing, the locked-tower cache) and ``trial`` (``finderpartner trial``).

Code outside this package imports from here, not from the modules (scripts/import_graph.py checks).
"""

from .recipe import TrainResult, build_optimizer, probe_run, setup, train
from .trial import run_trial
from .trial_report import format_report, parse_size

__all__ = ["TrainResult", "build_optimizer", "format_report", "parse_size", "probe_run", "run_trial", "setup", "train"]
