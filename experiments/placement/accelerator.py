"""The W2 DeepFM step on an accelerator (tables on the host, overlap on) beside
the same step on the same machine's CPU (the in-jit step, as placement
"auto" takes it there), and the exported model's predictions on both.

    python -m experiments.placement.accelerator                 # batch 4,096, 5 rounds x 10 steps
    python -m experiments.placement.accelerator --batch 512 --rounds 2 --steps 3

On a machine without an accelerator the CPU stands in for it (the first
line says so): the "accelerator" arm is then the host-tables step with
overlap on the CPU, which checks everything but the device. Prints only;
it writes nothing but a temporary export.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from experiments.placement import run as R


def _rate(trainer, raw, rounds: int, steps: int, warmup: int) -> float:
    trainer.fit(lambda: (R.to_batch(r) for r in raw[:warmup]))
    rates = []
    for r in range(rounds):
        part = raw[warmup + r * steps: warmup + (r + 1) * steps]
        t0 = time.perf_counter()
        trainer.fit(lambda: (R.to_batch(x) for x in part))
        rates.append(len(part) * part[0][0].shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None, out=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    stand_in = accel.platform == "cpu"
    out(f"accelerator: {accel.device_kind} ({accel.platform})"
        + ("  [no accelerator here: the CPU stands in for it]" if stand_in else ""))
    warmup = 3
    raw = R.stream(warmup + args.rounds * args.steps, args.batch)
    hidden = tuple(args.hidden)
    with jax.default_device(accel):
        on_accel = R.make_trainer(args.dim, hidden, placement="host" if stand_in else "auto", overlap=True)
        assert on_accel.step_placement() == "host"
        accel_rate = _rate(on_accel, raw, args.rounds, args.steps, warmup)
    with jax.default_device(cpu):
        on_cpu = R.make_trainer(args.dim, hidden)  # auto: the in-jit step
        cpu_placement = on_cpu.step_placement()
        cpu_rate = _rate(on_cpu, raw, args.rounds, args.steps, warmup)
    out(f"W2 DeepFM step, batch {args.batch:,}; medians of {args.rounds} rounds x {args.steps} steps")
    out(f"  {accel.platform}, tables on the host, overlap on: {accel_rate:>9,.0f} examples/s   "
        f"{accel_rate / cpu_rate:.2f}x the CPU")
    out(f"  cpu, {cpu_placement} step:{' ' * max(0, 22 - len(cpu_placement))}{cpu_rate:>9,.0f} examples/s")

    from monolith_jax.serving.export import export_model, load_exported

    batch = R.to_batch(raw[-1])
    with tempfile.TemporaryDirectory() as folder:
        spec = export_model(on_accel, folder, max_batch=args.batch)
        model = load_exported(folder)
    rows = on_accel.collection.find_host(batch)
    preds = {}
    lowered = {"cpu": {"cpu"}, "gpu": {"cuda", "rocm"}, "cuda": {"cuda"}, "rocm": {"rocm"}, "tpu": {"tpu"}}
    for device in {accel, cpu}:
        if not lowered.get(device.platform, {device.platform}) & set(spec["platforms"]):
            out(f"  the export was lowered for {spec['platforms']}, not {device.platform}: not run there")
            continue
        with jax.default_device(device):
            logits = model(jax.device_put(model.params, device), jax.device_put(rows, device),
                           jax.device_put(batch.lengths, device), jax.device_put(batch.dense, device))
            preds[device.platform] = np.asarray(jax.nn.sigmoid(logits))
    result = {"accelerator": accel.platform, "stand_in": stand_in, "accelerator_examples_per_s": accel_rate,
              "cpu_examples_per_s": cpu_rate, "cpu_placement": cpu_placement, "export_platforms": spec["platforms"]}
    if len(preds) == 2:
        diff = float(np.max(np.abs(preds[accel.platform] - preds["cpu"])))
        result["prediction_max_abs_diff"] = diff
        out(f"  exported model (lowered for {spec['platforms']}): predictions on {accel.platform} vs cpu, "
            f"max |diff| {diff:.2e} over {len(preds['cpu']):,} examples")
    else:
        out(f"  exported model (lowered for {spec['platforms']}) on cpu only (the CPU stands in): "
            f"{len(preds['cpu']):,} predictions, mean {float(np.mean(preds['cpu'])):.4f}")
    return result


if __name__ == "__main__":
    main()
