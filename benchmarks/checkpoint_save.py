"""How long a training checkpoint save blocks the loop, with sdjax's Orbax array handler and with
Orbax's default one (replica-parallel writes).

    python benchmarks/checkpoint_save.py [--devices 8] [--saves 3]

A tiny random pipeline and an 8-image dataset at 32 px (written once into ``--workdir``), one
training step on ``--devices`` simulated CPU devices (the weights replicated on each, as in
training), then ``--saves`` checkpoint saves of that state: the seconds ``save()`` blocked and the
seconds until the background write was complete, and the programs XLA compiled meanwhile. Each
handler runs in its own process. Orbax's default slices every replicated weight between its copies
with a small compiled program per weight shape and device; sdjax writes each from its first copy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(workdir: Path, handler: str, saves: int) -> dict:
    """One process: a Trainer, a step, ``saves`` timed saves (run with XLA_FLAGS set by the caller)."""
    import logging
    import shutil
    import time

    import jax
    import orbax.checkpoint as ocp

    from sdjax.training import checkpoint
    from sdjax.training.loop import TrainConfig, Trainer
    if handler == "orbax-default":   # Orbax's own registry: replica-parallel array writes
        types = ocp.type_handlers
        checkpoint._type_handlers = lambda: types.create_type_handler_registry(
            *[(ty, types.get_type_handler(ty)) for ty in types.supported_types()])
    compiles = []
    catcher = logging.Handler()
    catcher.emit = lambda record: compiles.append(record.getMessage().startswith("Compiling"))
    logging.getLogger("jax").addHandler(catcher)
    out = workdir / f"run-{handler}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=str(workdir / "tiny-sd"), train_data=str(workdir / "data"), output_dir=str(out),
                      resolution=32, batch_size=1, max_steps=100, checkpoint_every=1000, sample_steps=2)
    trainer = Trainer.create(cfg)
    try:
        trainer.state, metrics = trainer.step_fn(trainer.state, trainer.frozen, trainer.next_batch())
        jax.block_until_ready(metrics)
        rows = []
        for i in range(saves):
            compiles.clear()
            with jax.log_compiles(True):
                start = time.perf_counter()
                trainer.checkpoints.save(i + 1, trainer.state, trainer.data.state())
                blocked = time.perf_counter() - start
                trainer.checkpoints.wait()
            rows.append({"save": i + 1, "blocking_s": round(blocked, 2),
                         "complete_s": round(time.perf_counter() - start, 2), "compiles": sum(compiles)})
    finally:
        trainer.close()
    return {"handler": handler, "devices": jax.device_count(), "saves": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.environ.get("SDJAX_BENCH_DIR", "/tmp/sdjax-bench") + "/ckpt")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        print("RESULT " + json.dumps(measure(workdir, args.child, args.saves)))
        return
    import numpy as np
    from sdjax.training.data import write_captioned_folder
    if not (workdir / "tiny-sd").is_dir():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "common.py"), "build", "--size", "tiny", "--dir",
                        str(workdir / "tiny-sd")], check=True)
    if not (workdir / "data").is_dir():
        write_captioned_folder(workdir / "data", [(np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8),
                                                   f"photo {i}") for i in range(8)])
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
           "PYTHONPATH": str(ROOT)}
    print("| handler | save | blocking s | complete s | programs compiled |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for handler in ("sdjax", "orbax-default"):
        done = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--saves", str(args.saves),
                               "--child", handler], env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.split("RESULT ")[1].splitlines()[0])
        for row in result["saves"]:
            print(f"| {handler} | {row['save']} | {row['blocking_s']} | {row['complete_s']} | {row['compiles']} |")


if __name__ == "__main__":
    main()
