"""One training job: its description as frozen, validated dataclasses (`config`: JobConfig, Strategy,
TrainConfig) and the one step function that train, profile, bench and the dry run all run (`step`)."""
