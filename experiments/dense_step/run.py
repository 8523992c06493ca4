"""The dense-step benchmark's rounds. Each configuration (a set of XLA
flags, or two host devices) is a worker process of its own, since XLA
reads its flags once per process; the parent never imports JAX. All
workers build their arms and compile first; then in each round every
worker in turn runs each of its arms on the round's batches (the same
batches for every arm), so a noisy neighbour slows all of them alike, and
each arm is compared with the base configuration's arm in the same round."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

# name -> (XLA_FLAGS, arms). The base configuration (no flags) carries every
# in-process variant; each other configuration times the full step and the
# dense step alone, f32, to set beside base's.
CONFIGS = {
    "base": ("", ("full", "static", "dense", "full_bf16", "dense_bf16", "full_fm1", "dense_fm1",
                  "full_donate", "dense_donate")),
    "eigen_1thread": ("--xla_cpu_multi_thread_eigen=false", ("full", "dense")),
    "no_ynnpack": ("--xla_cpu_experimental_ynn_fusion_type=", ("full", "dense")),
    "ynnpack_all": ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise,reduce", ("full", "dense")),
    "xnnpack": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot,individual_dot",
                ("full", "dense")),
    "onednn": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=", ("full", "dense")),
    "fast_math": ("--xla_cpu_enable_fast_math=true", ("full", "dense")),
    "two_devices": ("--xla_force_host_platform_device_count=2", ("full", "dense", "full_bf16", "dense_bf16")),
    "ynnpack_all_two_devices": ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise,reduce "
                                "--xla_force_host_platform_device_count=2", ("full", "dense")),
}
ARM_KW = {"full": {}, "dense": {}, "static": {}, "full_bf16": {"matmul": "bf16"}, "dense_bf16": {"matmul": "bf16"},
          "full_fm1": {"fm": "one_pass"}, "dense_fm1": {"fm": "one_pass"}, "full_donate": {"donate": True},
          "dense_donate": {"donate": True}}


def arms_of(config: str, only=None) -> tuple:
    """The configuration's arms, those in `only` alone when given."""
    return tuple(a for a in CONFIGS[config][1] if only is None or a in only)


# ------------------------------------------------------------------ worker
def worker(config: str, batch: int, dim: int, hidden: tuple, steps: int, rounds: int, warmup: int,
           static_rows: int, curve_steps: int, only=None) -> None:
    """Reads one command a line on stdin ("round R", "curves", "quit"),
    answers one JSON line on stdout."""
    import jax

    from experiments.dense_step import arms
    from experiments.placement.run import stream

    raw = stream(warmup + rounds * steps, batch)
    arms_here = arms_of(config, only)
    steps_of = {}
    for arm in arms_here:
        kind, kw = arm.split("_")[0], ARM_KW[arm]
        if config.endswith("two_devices"):
            steps_of[arm] = arms.mesh_steps(dim, hidden, batch, **kw)[0 if kind == "full" else 1]
        elif kind == "full":
            steps_of[arm] = arms.full_step(dim, hidden, **kw)
        elif kind == "dense":
            steps_of[arm] = arms.dense_step(dim, hidden, batch, **kw)
        else:
            steps_of[arm] = arms.static_step(dim, hidden, static_rows, **kw)
    for arm in arms_here:  # compile, and fill the tables with the warm-up batches' rows
        jax.block_until_ready([steps_of[arm](r) for r in raw[:warmup]])
    _answer({"ready": config, "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
             "jax": jax.__version__})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "round":
            r = int(cmd[1])
            part = raw[warmup + r * steps: warmup + (r + 1) * steps]
            rates, losses = {}, {}
            for arm in arms_here:
                t0 = time.perf_counter()
                ls = [steps_of[arm](x) for x in part]
                jax.block_until_ready(ls)
                rates[arm] = steps * batch / (time.perf_counter() - t0)
                losses[arm] = [float(v) for v in ls]
            _answer({"rates": rates, "losses": losses, "load": os.getloadavg()[0]})
        elif cmd[0] == "curves":
            _answer(curves(batch, dim, hidden, curve_steps))
        else:
            return


def curves(batch, dim, hidden, n) -> dict:
    """The loss, batch by batch, of fresh full steps on one stream of n
    batches: f32 with the benchmark's init (seed 0) and another (seed 1),
    bf16 products and the one-pass FM with seed 0. f32 seed 0 against seed 1
    is the noise an init brings; a variant within it trains the same."""
    import jax

    from experiments.dense_step import arms
    from experiments.placement.run import stream

    raw = stream(n, batch, seed=1)
    out = {}
    for name, kw in (("f32", {}), ("f32_seed1", {"seed": 1}), ("bf16", {"matmul": "bf16"}),
                     ("fm1", {"fm": "one_pass"})):
        step = arms.full_step(dim, hidden, **kw)
        out[name] = [float(v) for v in jax.block_until_ready([step(r) for r in raw])]
        for t in step.trainer.tables.values():
            t.close()
    return {"curves": out}


def _answer(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ parent
class Worker:
    def __init__(self, config: str, argv: list):
        env = dict(os.environ)
        flags = CONFIGS[config][0]
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        self.config = config
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.dense_step.main", "--worker", config,
                                      *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.config} worker ended (exit {self.proc.wait()}) without answering "
                               f"{command or 'ready'}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def median_ratio(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def run(configs, argv: list, rounds: int, batch: int, steps: int, curve_steps: int, only=None, out=print) -> dict:
    t_start = time.time()
    workers = [Worker(c, argv) for c in configs]
    try:
        info = {w.config: w.ask() for w in workers}
        rates = {c: {arm: [] for arm in arms_of(c, only)} for c in configs}
        losses = {c: {arm: [] for arm in arms_of(c, only)} for c in configs}
        loads = []
        for r in range(rounds):
            for w in workers:
                ans = w.ask(f"round {r}")
                loads.append(ans["load"])
                for arm, v in ans["rates"].items():
                    rates[w.config][arm].append(v)
                    losses[w.config][arm] += ans["losses"][arm]
        curves = workers[0].ask("curves")["curves"] if curve_steps and configs[0] == "base" else None
    finally:
        for w in workers:
            w.close()
    result = {"batch": batch, "rounds": rounds, "steps_per_round": steps, "configs": {c: CONFIGS[c][0] for c in configs},
              "info": info, "examples_per_s_rounds": rates, "loss_per_step": losses,
              "examples_per_s": {c: {a: statistics.median(v) for a, v in arms.items()} for c, arms in rates.items()},
              "load_average": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
              "curves": curves, "wall_s": time.time() - t_start}
    report(result, out)
    return result


def report(res: dict, out) -> None:
    rates, med = res["examples_per_s_rounds"], res["examples_per_s"]
    base = rates["base"]
    la = res["load_average"]
    out(f"W2 step, batch {res['batch']:,}, on {res['info']['base']['platform']} (jax {res['info']['base']['jax']}); "
        f"medians of {res['rounds']} rounds x {res['steps_per_round']} steps; load average "
        f"{la['min']:.1f}-{la['max']:.1f} (median {la['median']:.1f}) on {os.cpu_count()} cores")
    out("  the three steps (base configuration):")
    for arm, what in (("full", "ours: Trainer in-jit, 26 collisionless tables"),
                      ("static", "plain JAX, static 2^20-row tables"), ("dense", "dense step alone, no tables")):
        if arm in base:
            v = med["base"][arm]
            rel = "  ".join(f"{median_ratio(base[arm], base[o]):.2f}x {o}" for o in ("full", "static", "dense")
                            if o in base and o != arm)
            out(f"    {arm:<7} {v:>9,.0f} examples/s   {rel}   ({what})")
    variants = [a for a in base if "_" in a and a.split("_")[0] in base]
    if variants:
        out("  variants, each against its f32 arm in the same round (median of per-round ratios):")
        for arm in variants:
            ref = arm.split("_")[0]
            out(f"    {arm:<13} {med['base'][arm]:>9,.0f} examples/s   {median_ratio(base[arm], base[ref]):.2f}x "
                f"{ref} ({med['base'][ref]:,.0f})")
    others = [c for c in rates if c != "base"]
    if others:
        out("  XLA configurations, each against base's arm in the same round (median of per-round ratios):")
        for c in others:
            parts = [f"{arm} {med[c][arm]:>7,.0f} = {median_ratio(rates[c][arm], base[arm.split('_')[0]]):.2f}x base"
                     for arm in rates[c] if arm.split("_")[0] in base]
            out(f"    {c:<14} " + "   ".join(parts) + f"   [{res['configs'][c]}]")
    if res.get("curves"):
        cv = res["curves"]
        n = len(cv["f32"])
        q = max(1, n // 4)

        def mean(xs):
            return sum(xs) / len(xs)
        out(f"  loss curves, fresh full steps on another W2 stream ({n} batches; mean loss per quarter):")
        for name, ls in cv.items():
            out(f"    {name:<10} " + "  ".join(f"{mean(ls[i:i + q]):.4f}" for i in range(0, n - q + 1, q))
                + f"   last quarter vs f32: {mean(ls[-q:]) - mean(cv['f32'][-q:]):+.4f}")
