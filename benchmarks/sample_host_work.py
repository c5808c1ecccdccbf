"""The host's own work per batch in sample.py's loop (`cli_utils.run_sampling`): checking and
tokenizing the batch's prompts, sharding its inputs, fetching and trimming its images, naming its
files and handing them to the PNG thread, with the sampler's device time and the PNG encoding
taken out (the compiled sampler is called once, then its output is returned at once; the PNG
writer does nothing).

    python benchmarks/sample_host_work.py [--size tiny|sd15] [--resolution 64] [--batch 1] [--batches 40]

Without `StableDiffusion.batches` dispatching the next batch before handing one over, the devices
sat idle for this time (plus the sampler call's dispatch, `jit_overhead.py`) at every batch; now
it overlaps the next batch's device time. Prints one line: ms per batch, the median of 3 runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workdir", default=None, help="where the random pipeline is built (see common.py)")
    args = parser.parse_args(argv)

    import jax

    import common as C
    from sdjax import StableDiffusion, cli_utils
    pipe = StableDiffusion.from_pretrained(C.ensure_pipeline(args.workdir or C.DEFAULT_WORKDIR, args.size))
    compiled, ready = pipe._generate, {}

    def at_once(*call_args, **kwargs):   # the sampler's output without its device time
        if "out" not in ready:
            ready["out"] = jax.block_until_ready(compiled(*call_args, **kwargs))
        return ready["out"]
    pipe._generate = at_once
    cli_utils.save_png = lambda *a, **k: None   # the PNG thread's encoding and writing

    def run() -> float:
        with tempfile.TemporaryDirectory() as out:
            req = cli_utils.SampleRequest(prompts=["a photo of a cat, highly detailed"],
                                          seeds=list(range(args.batch * args.batches)), steps=2,
                                          height=args.resolution, width=args.resolution, batch_size=args.batch,
                                          out=out)
            start = time.perf_counter()
            cli_utils.run_sampling(pipe, req, progress="none")
            return (time.perf_counter() - start) / args.batches
    run()   # compiles the sampler once
    per_batch = statistics.median(run() for _ in range(3))
    print(f"{args.size}, {args.resolution} px, batch {args.batch} ({jax.devices()[0].device_kind}): "
          f"{per_batch * 1e3:.2f} ms of host work per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
