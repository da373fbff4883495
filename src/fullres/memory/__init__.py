"""Memory of a training job: Table 1 (`table1`), the dry run (`dryrun`, with its runtime term in
`runtime` and its allocator models in `cuda_allocator`, `malloc`, `cpu_pool`), the estimators by name and
`profile` (`estimate`), real measurements (`measure`), the planner, strategy search and preflight
(`plan`), and sweeps over many jobs (`sweep`)."""
