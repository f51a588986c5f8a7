"""The guide's rules of thumb as code (``wandb_setup_guide.md``: "Rigorously Analyzing Parameters",
"Using W&B for Debugging"). Each rule is a pure function over a run's history (:mod:`.rules`, on
:mod:`.history`). The same functions run in two places: during training on the main process
(:mod:`.monitor`, on each logged record) and in ``mmtrain report`` (:func:`diagnose_columns` /
:func:`diagnose_run`, on ``metrics.jsonl``). Thresholds are ``DiagnosticsConfig`` fields; the
README's Diagnostics table states each rule. Imports no torch: the report uses it.
"""

from mmtrain.diagnostics.history import PANELS, Dropped, Finding, History, LrSchedule, RunContext
from mmtrain.diagnostics.monitor import DiagnosticsMonitor, build_diagnostics, event
from mmtrain.diagnostics.rules import RULES, diagnose, diagnose_columns, diagnose_run, thresholds_from

__all__ = ["PANELS", "RULES", "DiagnosticsMonitor", "Dropped", "Finding", "History", "LrSchedule", "RunContext",
           "build_diagnostics", "diagnose", "diagnose_columns", "diagnose_run", "event", "thresholds_from"]
