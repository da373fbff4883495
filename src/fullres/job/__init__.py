"""One training job: its description as frozen, validated dataclasses (`strategy`: Strategy, torch-free so
the command line reads it before torch is imported; `config`: JobConfig, TrainConfig) and the one step
function that train, profile, bench and the dry run all run (`step`)."""
