"""Any network across processes (fullres.engine.tape with a fullres.engine.spatial.Space): processes sharing one
volume along H, each its rows of every map (in slabs or whole), give the whole volume's output, parameter
gradients and batch-norm statistics, in float64 (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torch import nn

from fullres.cost.plan import check_spatial
from fullres.engine.spatial import simulated
from fullres.engine.tape import SlabForward, record, slab_network
from fullres.job.config import JobConfig, Strategy
from fullres.nets.registry import ModelConfig, build_model
from gloo_workers import run_workers
from test_tape import FAMILIES, Zoo, family

WORKER = r"""
import sys
from datetime import timedelta
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[6])
from test_tape_spatial import build
from fullres.engine.spatial import local_rows, mesh, reduce_gradients, space_of
from fullres.job.config import Strategy
from fullres.job.step import prepare_model, use_space

rank, world, init, out, cases = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=90))
device_mesh = mesh(world)
for case in cases.split(" "):
    job = torch.load(f"{out}/{case}.pt")
    model = build(job["network"], job["p"])
    space = space_of(device_mesh, job["x"].shape[2])
    counts = job["counts"]  # as train sets a model up: its strategy, then its space
    prepare_model(model, Strategy(slabs=counts[0], coarse_slabs=",".join(map(str, counts[1:])),
                                  recompute_inputs=job["recompute_inputs"]))
    use_space(model, space)
    torch.manual_seed(5)  # the dropout seed: alike on every process
    y = model(local_rows(job["x"], space))
    lo, hi = space.rows(0)
    rows = torch.arange(lo, hi).view(1, 1, -1, 1, 1)
    (y.square().sum() + (y * ((rows >= 3) & (rows < 9))).sum()).backward()  # each process's share of the loss
    reduce_gradients(model.parameters())
    torch.save({"output": y.detach(), "rows": (lo, hi), "grads": [p.grad for p in model.parameters()],
                "buffers": [b.clone() for b in model.buffers()]}, f"{out}/{case}-rank{rank}.pt")
dist.destroy_process_group()
"""

CASES = {  # name: (network, input height, counts, recompute inputs, processes, dropout)
    **{f"{name}-2": (name, 32, (1,), 0, 2, 0.0) for name in FAMILIES},
    **{f"{name}-2-slabs": (name, 32, (4, 2), 0, 2, 0.0) for name in FAMILIES},
    "zoo-2": ("zoo", 32, (1,), 0, 2, 0.0),
    "unet3d-2-slabs": ("unet3d", 32, (4, 2, 2), 0, 2, 0.0),  # the paper's network in slabs: through its tape
    "zoo-2-slabs-dropout": ("zoo", 32, (4, 2, 2), 0, 2, 0.3),
    "nnunet:PlainConvUNet-4-slabs-recompute": ("nnunet:PlainConvUNet", 64, (2, 2), 1, 4, 0.0),
    "monai:SegResNet-4-slabs": ("monai:SegResNet", 64, (4, 2), 0, 4, 0.0),
}


def build(network: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    if network == "unet3d":
        return build_model(ModelConfig(in_channels=2, classes=3, filters=4, norm="instance", dropout=p),
                           (32, 32, 32)).double()
    return Zoo(p).double() if network == "zoo" else family(network)


def reference(network: str, x: torch.Tensor, counts, recompute_inputs: int, p: float):
    """One process: the whole volume's output, gradients and buffers (with dropout, in slabs: the hashed mask
    any schedule draws alike)."""
    model = build(network, p)
    if p:
        slab_network(model, (2,))
    torch.manual_seed(5)
    y = model(x)
    rows = torch.arange(x.shape[2]).view(1, 1, -1, 1, 1)
    (y.square().sum() + (y * ((rows >= 3) & (rows < 9))).sum()).backward()
    return y.detach(), [p.grad for p in model.parameters()], list(model.buffers())


def run_cases(tmp_path: Path, world: int) -> None:
    """Every case of `world` processes, one after another in one process group; each checked against one process."""
    cases = [case for case, (*_, processes, _p) in CASES.items() if processes == world]
    inputs = {}
    for case in cases:
        network, height, counts, recompute_inputs, _, p = CASES[case]
        inputs[case] = torch.randn(1, 2, height, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.save({"network": network, "x": inputs[case], "counts": counts, "recompute_inputs": recompute_inputs,
                    "p": p}, tmp_path / f"{case}.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_workers(script, world, [tmp_path / "init", tmp_path, " ".join(cases), Path(__file__).parent], timeout=400)
    for case in cases:
        network, _, counts, recompute_inputs, _, p = CASES[case]
        output, grads, buffers = reference(network, inputs[case], counts, recompute_inputs, p)
        scale = max(g.abs().max() for g in grads if g is not None)
        for rank in range(world):
            result = torch.load(tmp_path / f"{case}-rank{rank}.pt")
            lo, hi = result["rows"]
            assert torch.allclose(result["output"], output[:, :, lo:hi], rtol=0, atol=1e-12 * output.abs().max()), case
            for a, b in zip(grads, result["grads"]):
                assert (a is None) == (b is None), case
                if a is not None:  # at the model's scale (a bias before a normalisation has a zero gradient); the
                    # sums over processes add another order of summation to float64's rounding
                    assert torch.allclose(b, a, rtol=0, atol=1e-10 * scale), case
            for a, b in zip(buffers, result["buffers"]):  # batch norm's running statistics
                assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14), case


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_processes_sharing_a_volume_give_any_networks_whole_volume_step(tmp_path, world):
    """Every family (and the operations zoo, with dropout) across 2 processes, each process's rows whole and in
    slabs; two across 4, in slabs (one with recomputed level inputs)."""
    run_cases(tmp_path, world)


def test_a_map_too_short_for_its_halos_is_refused_naming_it():
    """Four 2x downsamplings of 64 rows leave 4 rows, one a process for four: a 5-row kernel there reads two
    rows of each neighbour."""
    deep = nn.Sequential(*[nn.Conv3d(2, 2, 3, stride=2, padding=1) for _ in range(4)], nn.Conv3d(2, 2, 5, padding=2),
                         nn.Upsample(scale_factor=16))
    tape = record(deep, (1, 2, 64, 8, 8))
    SlabForward(tape, (1,), space=simulated(64, 2))
    with pytest.raises(ValueError, match=r"^--spatial 4: a map of 4 rows \(operation 4, conv3d\) leaves a process 1 row\(s\), "
                                         r"fewer than the 2 its neighbours read"):
        SlabForward(tape, (1,), space=simulated(64, 4))


def test_a_process_sharing_a_volume_is_dry_run_on_its_rows_in_slabs():
    """What `train --spatial 2`'s preflight computes for a network on its tape: each process's shard of a
    slabbed job, halos included, dry-runs below the whole volume's and above half of it."""
    from fullres.cost.dryrun import dryrun

    segresnet = ModelConfig(architecture="monai:SegResNet", in_channels=4, classes=3, args='{"init_filters": 8}')
    job = JobConfig(model=segresnet, shape=(32, 16, 16), batch=1,
                    strategy=Strategy(checkpointing=True, slabs=2, coarse_slabs="2"))
    whole = dryrun(job, runtime=0).peak_bytes
    shares = [dryrun(job, spatial=2, spatial_index=k, runtime=0).peak_bytes for k in (0, 1)]
    assert all(whole / 2 < share < whole for share in shares), (whole, shares)


def test_which_jobs_split_across_processes():
    segresnet = ModelConfig(architecture="monai:SegResNet", in_channels=2, classes=3, args='{"init_filters": 8}')
    check_spatial(JobConfig(model=segresnet, shape=(32, 16, 16), batch=1), 2)
    check_spatial(JobConfig(model=segresnet, shape=(64, 16, 16), batch=1, strategy=Strategy(slabs=4,
                                                                                              coarse_slabs="2")), 4)
    check_spatial(JobConfig(model=ModelConfig(filters=2), shape=(64, 16, 16), batch=1, strategy=Strategy(slabs=2)), 2)
    refusals = [(segresnet, (32, 16, 16), 3, "--spatial 3: H=32 must be a multiple of 8 with at least 16 rows per "
                                             "process (48 in all)"),
                (ModelConfig(architecture="monai:UNETR", in_channels=2, classes=3), (32, 32, 32), 2,
                 "--spatial 2: monai:UNETR cannot run in slabs: its transformer attends")]
    for model, shape, processes, message in refusals:
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            check_spatial(JobConfig(model=model, shape=shape, batch=1), processes)
