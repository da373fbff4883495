"""The cost model of a training job. Memory: Table 1 (`table1`), the dry run on fake tensors (`dryrun`)
with its runtime term (`runtime`), real measurements (`measure`), the estimators by name (`estimate`).
Time: FLOPs from torch's counter (`flops`), one step timed under a variant (`steptime`), the wall-time
estimate (`timing`). Decisions: the planner, strategy search and preflight (`plan`), sweeps (`sweep`)."""
