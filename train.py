"""Fine-tune Stable Diffusion v1.5 with sdjax: python train.py --model DIR --train-data DIR --output-dir OUT.

Thin entry point: parse the flags (sdjax.training.cli), run sdjax.training.loop, print the result.
"""
import sys


def exported(final, cfg) -> str:
    """The export's folder, and its single file when one was written."""
    from sdjax.training.loop import Trainer
    from sdjax.weights import LORA_FILE_NAME
    if cfg.lora_rank is not None:
        return str(final / LORA_FILE_NAME)
    if not cfg.export_single_file:
        return str(final)
    return f"{final} and {Trainer.single_file_path(final)} ({cfg.export_single_file})"


def how_to_resume(cfg) -> str:
    """Where a stopped run can go on from: its newest complete checkpoint, or none yet."""
    from pathlib import Path
    from sdjax.training.checkpoint import checkpoint_steps
    directory = Path(cfg.output_dir)
    steps = checkpoint_steps(directory / "checkpoints")
    if not steps:
        first = min(cfg.checkpoint_every, cfg.max_steps)   # every N steps and at the end
        return f"no checkpoint was saved yet in {directory / 'checkpoints'} (the first is at step {first})"
    return (f"the newest complete checkpoint is step {steps[-1]}: python train.py --output-dir {directory} --resume "
            "continues from it")


STOP = None   # the StopRequest of the run in this process (set in main)


def _terminate(signum, frame):
    # During training the loop saves a checkpoint of the step in flight and stops; otherwise now.
    if STOP is None or not STOP.request():
        from sdjax.cli_utils import raise_terminated   # before training started or after it ended
        raise_terminated(signum, frame)


def _interrupt(signum, frame):
    # Noted first: Python drops a KeyboardInterrupt raised inside a garbage-collection callback
    # (JAX has one), and the training loop then raises it at the end of the step.
    if STOP is not None:
        STOP.interrupt()
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """train.py; SIGTERM during training saves a checkpoint of the step in flight and stops (exit
    143); before or after it, it stops as Ctrl-C does (the checkpoints being saved complete first)."""
    global STOP
    import signal
    import threading
    import jax
    from sdjax import parallel
    from sdjax.training.loop import StopRequest
    try:
        if not {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
            parallel.initialize_distributed()
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    STOP = StopRequest()
    if threading.current_thread() is not threading.main_thread():   # signals reach only the main thread
        return _main(argv)
    # On several processes JAX's preemption service owns SIGTERM: the training loop asks it at every
    # step, and every process stops at the same one.
    handlers = {signal.SIGINT: _interrupt, **({signal.SIGTERM: _terminate} if jax.process_count() == 1 else {})}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _export(cfg, args) -> int:
    """train.py --export: only the checkpoint's weights: no training data, and nothing of the run's
    is rewritten (metrics.jsonl, train_config.json). A write that fails (a full disk) or the device
    running out of memory is one line (exit 1), as in training."""
    from pathlib import Path
    import jax
    from sdjax.cli_utils import out_of_memory
    from sdjax.cli_utils import UsageError
    from sdjax.training.loop import Trainer, lora_export_problem
    if cfg.lora_rank is not None and (problem := lora_export_problem(Path(cfg.output_dir) / "final")):
        raise UsageError(f"--export: {problem}")   # (before the model loads; Trainer.export checks it again)
    try:
        trainer = Trainer.for_export(cfg, step=getattr(args, "export_step", None))
        try:
            try:
                final = trainer.export()
            except FileNotFoundError:
                raise
            except OSError as e:   # Trainer.export writes beside the earlier export and replaces it once complete
                print(f"train.py: error: cannot write the export {exported(Path(cfg.output_dir) / 'final', cfg)}: "
                      f"{e}; an earlier export there is left as it was", file=sys.stderr)
                return 1
            if final is not None:  # None on processes other than 0, which write nothing
                print(f"exported step {int(trainer.state.step)} to {exported(final, cfg)}")
        finally:
            trainer.close()
    except jax.errors.JaxRuntimeError as e:
        # The export restores the checkpoint's whole training state (weights, optimizer state, EMA).
        message = out_of_memory(e, "run the same command with JAX_PLATFORMS=cpu to export from the computer's "
                                   "memory instead")
        if message is None:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1
    return 0


def _main(argv=None) -> int:
    import jax
    from sdjax.cli_utils import (UsageError, attention_memory_advice, count, interruption, out_of_memory,
                                 show_warnings_as_lines)
    show_warnings_as_lines("train.py")
    from sdjax.training.data import DataError, ImageReadError, TFDSNotInstalled
    from sdjax.training.loop import Stopped, TrainingDiverged, train  # before the try: its except names them
    from sdjax.weights import CheckpointError
    try:
        from sdjax.training.cli import parse_args
        cfg, args = parse_args(argv)
        from sdjax.cli_utils import enable_compilation_cache
        enable_compilation_cache(getattr(args, "compilation_cache", None))   # before anything compiles
        if args.recorded:
            print(f"settings recorded in {args.recorded}, with the flags given here over them")
        if getattr(args, "export", False):
            return _export(cfg, args)
        try:
            final = train(cfg, stop=STOP, resume_step=getattr(args, "resume_step", None))
        except Stopped as e:   # SIGTERM (a preemption) during training: the step in flight was saved
            print(f"\ntrain.py: terminated (SIGTERM) after saving step {e.step}; {how_to_resume(cfg)}",
                  file=sys.stderr)
            return 143
        except jax.errors.JaxRuntimeError as e:
            attention = attention_memory_advice(training=True)
            message = out_of_memory(e, "lower --batch-size (and raise --gradient-accumulation to keep the global "
                                       "batch), or try --mixed-precision bf16, --gradient-checkpointing, a lower "
                                       f"--resolution, or --config low_memory{attention}; --resume continues from "
                                       f"the last checkpoint in {cfg.output_dir}")
            if message is None:
                raise
            print(f"train.py: error: {message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            stopped, code = interruption(e)
            print(f"\ntrain.py: {stopped}; {how_to_resume(cfg)}", file=sys.stderr)
            return code
        except FileNotFoundError:
            raise
        except OSError as e:   # a full disk, a network folder gone: the run stopped where it was
            print(f"train.py: error: {e}; {how_to_resume(cfg)}", file=sys.stderr)
            return 1
        except ImageReadError as e:   # an image deleted or changed since the data was checked
            print(f"train.py: error: {e}; {how_to_resume(cfg)} once the image is back (leaving its row out "
                  "changes the data, which a resume refuses)", file=sys.stderr)
            return 1
        if final is not None:
            what = "LoRA" if cfg.lora_rank is not None else "pipeline"
            print(f"done: {count(cfg.max_steps, 'step')}; {what} exported to {exported(final, cfg)}")
        return 0
    except (UsageError, DataError, CheckpointError, FileNotFoundError, TFDSNotInstalled) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt as e:   # before training started (loading, an export): nothing half-written
        from sdjax.cli_utils import interruption
        stopped, code = interruption(e)
        print(f"\ntrain.py: {stopped}", file=sys.stderr)
    if code in (130, 143):
        from sdjax.cli_utils import exit_after_interrupt
        exit_after_interrupt(code)
    sys.exit(code)
