"""fullres against TensorFlow + oneDNN on the same training step, alternated: the paper's network, one
step of each framework in its own fresh process, rounds alternating which runs first, per precision.

    python benchmarks/versus_tensorflow.py --tf-python /tmp/tfvenv/bin/python [--shape 64 64 64]
        [--precisions fp32 bf16] [--rounds 3] [--warmup 2] [--repeats 3] [--out versus-tf.json]

fullres runs `fullres bench --variants fp32_cl|bf16_cl` (channels-last, the layout TensorFlow uses);
TensorFlow runs `benchmarks/tensorflow_reference.py` (`--precision bf16`: Keras's mixed_bfloat16) with
TF_ENABLE_ONEDNN_OPTS=1, in the interpreter given by --tf-python (TensorFlow is not a fullres dependency:
install `tensorflow-cpu==2.21.0` in its own virtual environment). Each row is the median of `repeats`
timed steps after `warmup` untimed ones; the ratio is TensorFlow's step over fullres's (above 1: fullres
is faster), one per round, and their median per precision. Prints the command, the date, the machine,
both versions, every round and the summary; writes all of it as JSON to --out. Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from fullres.cost.steptime import machine_info
from fullres.files import write_bytes_atomically

HERE = Path(__file__).resolve().parent
VARIANT = {"fp32": "fp32_cl", "bf16": "bf16_cl"}


def fullres_step(shape, batch, precision, warmup, repeats, threads) -> dict:
    command = [sys.executable, "-m", "fullres", "bench", "--shape", *map(str, shape), "--batch", str(batch),
               "--variants", VARIANT[precision], "--warmup", str(warmup), "--repeats", str(repeats), "--json"]
    if threads:
        command += ["--threads", str(threads)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    (variant,) = result["variants"]
    return {"step_s": variant["step_s"], "all_s": variant["step_s_all"],
            "matmul_peak_tflops": result["matmul_peak_tflops"][precision], "tflops": variant["tflops"],
            "fraction_of_peak": variant["fraction_of_peak"]}


def tensorflow_step(tf_python, shape, batch, precision, warmup, repeats) -> dict:
    command = [tf_python, str(HERE / "tensorflow_reference.py"), "--shape", *map(str, shape), "--batch", str(batch),
               "--precision", precision, "--warmup", str(warmup), "--repeats", str(repeats)]
    environment = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return {"step_s": result["step_s"], "min_s": result["min_s"], "max_s": result["max_s"],
            "framework": result["framework"], "weights": result["weights"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", required=True, help="a Python interpreter with tensorflow-cpu installed")
    parser.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64], metavar=("H", "W", "D"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", choices=sorted(VARIANT), default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per precision, alternating which runs first")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="fullres's intra-op threads (default: its own choice)")
    parser.add_argument("--out", default="versus-tf.json")
    args = parser.parse_args()

    machine = machine_info("cpu")
    command = shlex.join(["python", "benchmarks/versus_tensorflow.py", *sys.argv[1:]])
    print(f"$ {command}\ndate: {machine['date']}\nmachine: {machine['cpu']} ({machine['logical_cpus']} logical "
          f"CPUs); torch {machine['torch']}; load average {machine['load_average_1min']:.2f}", flush=True)
    rounds = []
    for precision in args.precisions:
        for index in range(args.rounds):
            order = ("fullres", "tensorflow") if index % 2 == 0 else ("tensorflow", "fullres")
            row = {"precision": precision, "round": index + 1, "first": order[0]}
            for framework in order:
                if framework == "fullres":
                    row["fullres"] = fullres_step(args.shape, args.batch, precision, args.warmup, args.repeats,
                                                  args.threads)
                else:
                    row["tensorflow"] = tensorflow_step(args.tf_python, args.shape, args.batch, precision,
                                                        args.warmup, args.repeats)
            row["ratio"] = row["tensorflow"]["step_s"] / row["fullres"]["step_s"]
            rounds.append(row)
            print(f"{precision} round {index + 1} ({order[0]} first): fullres {row['fullres']['step_s']:.3f} s, "
                  f"{row['tensorflow']['framework']} {row['tensorflow']['step_s']:.3f} s, "
                  f"TensorFlow / fullres {row['ratio']:.3f}; fullres at {row['fullres']['fraction_of_peak']:.0%} of "
                  f"the {precision} matmul peak ({row['fullres']['matmul_peak_tflops']:.3f} TFLOP/s)", flush=True)
    summary = {}
    for precision in args.precisions:
        ratios = [r["ratio"] for r in rounds if r["precision"] == precision]
        summary[precision] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                              "max_ratio": max(ratios)}
        print(f"{precision}: TensorFlow / fullres median {summary[precision]['median_ratio']:.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) over {len(ratios)} rounds")
    result = {"command": command, "machine": machine, "shape": args.shape, "batch": args.batch,
              "rounds": rounds, "summary": summary}
    write_bytes_atomically(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
