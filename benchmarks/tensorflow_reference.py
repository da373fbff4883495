"""The paper's own stack as a reference: the Table 1 3D U-Net in TensorFlow/Keras, one training step timed
with oneDNN on and off, so that fullres's step can be compared with it on the same machine, in the same
session (docs/performance.md).

TensorFlow is not a fullres dependency. Run this in a separate virtual environment:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0
    TF_ENABLE_ONEDNN_OPTS=1 /tmp/tfvenv/bin/python benchmarks/tensorflow_reference.py --shape 64 64 64
    TF_ENABLE_ONEDNN_OPTS=0 /tmp/tfvenv/bin/python benchmarks/tensorflow_reference.py --shape 64 64 64

The network is Table 1's: 3x3x3 'same' convolutions with ReLU (32/64 ... 256/512 filters), 2x2x2
max-pooling, dropout 0.2 after conv3a and conv4a, 2x2x2 stride-2 transposed convolutions that keep the
channel count, concatenation skips, a 1x1x1 sigmoid prediction: 19,735,329 weights (checked below).
Loss: soft Dice; optimizer: Adam; channels-last (NDHWC, TensorFlow's layout). `--precision bf16` runs it
under Keras's `mixed_bfloat16` policy (bf16 compute, fp32 weights and loss, the prediction layer in fp32),
the counterpart of fullres's bf16 autocast. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def unet(shape, channels: int, filters: int):
    from tensorflow import keras
    from tensorflow.keras import layers

    def conv(x, n, name):
        return layers.Conv3D(n, 3, padding="same", activation="relu", name=name)(x)

    f = filters
    inputs = keras.Input((*shape, channels))
    c1 = conv(conv(inputs, f, "conv1a"), 2 * f, "conv1b")
    c2 = conv(conv(layers.MaxPooling3D(2)(c1), 2 * f, "conv2a"), 4 * f, "conv2b")
    x = layers.Dropout(0.2)(conv(layers.MaxPooling3D(2)(c2), 4 * f, "conv3a"))
    c3 = conv(x, 8 * f, "conv3b")
    x = layers.Dropout(0.2)(conv(layers.MaxPooling3D(2)(c3), 8 * f, "conv4a"))
    x = conv(x, 16 * f, "conv4b")
    x = layers.Conv3DTranspose(16 * f, 2, strides=2, name="transConv4")(x)
    x = conv(conv(layers.Concatenate()([x, c3]), 8 * f, "conv5a"), 8 * f, "conv5b")
    x = layers.Conv3DTranspose(8 * f, 2, strides=2, name="transConv5")(x)
    x = conv(conv(layers.Concatenate()([x, c2]), 4 * f, "conv6a"), 4 * f, "conv6b")
    x = layers.Conv3DTranspose(4 * f, 2, strides=2, name="transConv6")(x)
    x = conv(conv(layers.Concatenate()([x, c1]), 4 * f, "conv7a"), 4 * f, "conv7b")
    # float32 output under mixed precision, as Keras's mixed-precision guide asks of the last layer.
    outputs = layers.Conv3D(1, 1, activation="sigmoid", name="PredictionMask", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description="Table 1 U-Net training step in TensorFlow")
    parser.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: Keras's mixed_bfloat16 policy (bf16 compute, fp32 weights)")
    args = parser.parse_args()

    import tensorflow as tf

    if args.precision == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")

    model = unet(tuple(args.shape), 4, args.filters)
    optimizer = tf.keras.optimizers.Adam(1e-4)
    images = tf.random.normal((args.batch, *args.shape, 4))
    targets = tf.cast(tf.random.uniform((args.batch, *args.shape, 1)) > 0.5, tf.float32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            intersection = tf.reduce_sum(p * y, axis=[1, 2, 3, 4])
            total = tf.reduce_sum(p, axis=[1, 2, 3, 4]) + tf.reduce_sum(y, axis=[1, 2, 3, 4])
            loss = tf.reduce_mean(1.0 - (2.0 * intersection + 1.0) / (total + 1.0))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    times = []
    for index in range(args.warmup + args.repeats):
        start = time.perf_counter()
        step(images, targets).numpy()  # .numpy() waits for the step
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"framework": f"tensorflow {tf.__version__}",
                      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                      "precision": args.precision,
                      "weights": int(sum(int(tf.size(v)) for v in model.trainable_variables)),
                      "shape": args.shape, "batch": args.batch, "threads": os.cpu_count(),
                      "step_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}))


if __name__ == "__main__":
    main()
