"""The ``rlnf`` command. Heavy imports (torch, NeMo) happen inside the commands, so ``--help`` is instant.

    rlnf --version                                  the installed version
    rlnf run RECIPE --config FILE [key=value ...]   run a recipe (torchtune style)
    rlnf run RECIPE --config FILE [...] --print-config
                                                    print the resolved config (presets filled) and exit
    rlnf ls                                         list recipes and shipped configs
    rlnf cp CONFIG DEST [--force]                   copy a shipped config (e.g. rl/grpo_learned_reward) to edit
    rlnf config RECIPE                              every config key with its default and help
    rlnf evaluate --model M.nemo --manifest M.json  greedy WER/CER (+ mean reward)
    rlnf score --reward CKPT --manifest M.json      score (audio, text) pairs with a reward model
    rlnf adapt-batchnorm --model M.nemo --manifest M.json --output A.nemo
                                                    BatchNorm statistics re-estimated on untranscribed audio
    rlnf adapt suta --model M.nemo --manifest M.json --output-manifest H.json
                                                    SUTA: per-utterance test-time adaptation, greedy transcripts
    rlnf data synth --output DIR                    synthesise an offline speech corpus
    rlnf data pairs --model M.nemo --manifest L.json --output P.jsonl
                                                    scored pairs (the reward model's training data)
    rlnf demo                                       the end-to-end offline demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from rlnf import __version__
from rlnf.config.suta import SUTA_DEFAULTS, SUTA_PARAMS
from rlnf.errors import RlnfError, TrainingInterrupted
from rlnf.launcher import list_configs, list_recipes, load_recipe, resolve
from rlnf.resources import configs_dir


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rlnf").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_nemo() -> None:
    """NeMo logs a great deal at INFO/WARNING while restoring models; keep errors only."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.ERROR)
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from rlnf.run_folder import open_run_folder

    # config errors before any heavy import; --print-config neither checks nor touches the run folder
    recipe, cfg = resolve(args.recipe, args.config, args.overrides, check_output=not args.print_config)
    if args.print_config:
        from rlnf.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    with open_run_folder(cfg) as args.log_dir:  # a crash's log goes into the run's folder
        quiet_nemo()
        result = recipe.main(cfg)
    if isinstance(result, dict) and result:  # empty on the processes other than rank 0
        print(json.dumps({k: v for k, v in result.items() if k != "final_metrics"}, indent=2, default=str))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    print("RECIPES")
    for name in list_recipes():
        print(f"  {name}")
    print(f"CONFIGS in {configs_dir()} (pass to --config by name, or `rlnf cp NAME my.yaml` and pass its path)")
    for name in list_configs():
        print(f"  {name}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from rlnf.launcher import copy_config

    print(copy_config(args.config, args.dest, force=args.force))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from rlnf.config import iter_keys

    recipe = load_recipe(args.recipe)
    for key, default, help_text in iter_keys(recipe.CONFIG_CLASS):
        print(f"{key} = {default!r}\n    {help_text}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.commands import evaluate

    metrics = evaluate(args.model, args.manifest, reward=args.reward, output=args.output,
                       batch_size=args.batch_size, device=args.device, text_key=args.text_key)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.commands import score

    score(args.reward, args.manifest, text_keys=args.text_key or ["text"], output=args.output,
          batch_size=args.batch_size, device=args.device)
    return 0


def cmd_adapt_batchnorm(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.commands import adapt_batchnorm

    print(json.dumps(adapt_batchnorm(args.model, args.manifest, args.output, batch_size=args.batch_size,
                                     device=args.device), indent=2))
    return 0


def cmd_adapt_suta(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.commands import adapt_suta

    print(json.dumps(adapt_suta(args.model, args.manifest, args.output_manifest, steps=args.steps, lr=args.lr,
                                temperature=args.temperature, em_weight=args.em_weight, params=args.params,
                                weight_decay=args.weight_decay, exclude_blank_frames=args.exclude_blank_frames,
                                mcc_reweight=args.mcc_reweight, batchnorm=args.batchnorm,
                                batch_size=args.batch_size, device=args.device, text_key=args.text_key,
                                force=args.force), indent=2))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from rlnf.synth import synthesize_corpus_cli

    synthesize_corpus_cli(args)
    return 0


def cmd_data_pairs(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.commands import scored_pairs

    summary = scored_pairs(args.model, args.manifest, args.output, limit=args.limit,
                                 temperatures=args.temperatures, samples_per_temperature=args.samples_per_temperature,
                                 error_rates=args.error_rates, seed=args.seed, batch_size=args.batch_size,
                                 device=args.device, text_key=args.text_key, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    quiet_nemo()
    from rlnf.demo import run_demo

    run_demo(output_dir=args.output, budget_minutes=args.minutes, fresh=args.fresh,
             settings=None if args.suta else {"suta": False})
    return 0


# ------------------------------------------------------------------------------------------ parser
def float_list(text: str) -> list[float]:
    """'0.6,1.0,1.4' -> [0.6, 1.0, 1.4]."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlnf", description="RL fine-tuning of NeMo CTC speech-recognition models "
                                                              "against a learned reward.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"rlnf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe with a YAML config and key=value overrides")
    run.add_argument("recipe", help="recipe name (see `rlnf ls`) or path to a recipe .py")
    run.add_argument("--config", help="YAML config file, or a shipped config name such as rl/rloo")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="overrides, e.g. trainer.max_steps=100 (before or after --config)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config (YAML, presets filled) and exit: no run folder, no model")
    run.set_defaults(func=cmd_run)

    commands.add_parser("ls", help="list recipes and shipped configs").set_defaults(func=cmd_ls)

    cp = commands.add_parser("cp", help="copy a shipped config to edit (like torchtune's `tune cp`)")
    cp.add_argument("config", help="shipped config name, e.g. rl/grpo_learned_reward (see `rlnf ls`)")
    cp.add_argument("dest", help="destination file, or a folder to copy into under the config's file name")
    cp.add_argument("--force", action="store_true", help="replace the destination if it exists")
    cp.set_defaults(func=cmd_cp)

    config = commands.add_parser("config", help="print every config key of a recipe with default and help")
    config.add_argument("recipe")
    config.set_defaults(func=cmd_config)

    evaluate = commands.add_parser("evaluate", help="greedy transcripts, WER, CER and mean reward of a model")
    evaluate.add_argument("--model", required=True, help=".nemo file or pretrained name")
    evaluate.add_argument("--manifest", required=True)
    evaluate.add_argument("--reward", help="reward checkpoint folder (adds the mean learned reward)")
    evaluate.add_argument("--output", help="OUT.json for the metrics; transcripts go to OUT.transcripts.jsonl")
    evaluate.add_argument("--text-key", default="text")
    evaluate.add_argument("--batch-size", type=positive_int, default=16)
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(func=cmd_evaluate)

    score = commands.add_parser("score", help="score (audio, text) pairs with a reward model, no references needed")
    score.add_argument("--reward", required=True, help="reward checkpoint folder")
    score.add_argument("--manifest", required=True)
    score.add_argument("--text-key", action="append", help="manifest field(s) to score; repeat to compare systems "
                                                           "(default: text)")
    score.add_argument("--output", help="OUT.jsonl: the manifest rows with score fields added")
    score.add_argument("--batch-size", type=positive_int, default=64)
    score.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    score.set_defaults(func=cmd_score)

    def batchnorm_arguments(adapt: argparse.ArgumentParser) -> None:  # rlnf adapt-batchnorm = rlnf adapt batchnorm
        adapt.add_argument("--model", required=True, help=".nemo file or pretrained name")
        adapt.add_argument("--manifest", required=True, help="the audio to adapt to (no text needed)")
        adapt.add_argument("--output", required=True, help="the adapted .nemo")
        adapt.add_argument("--batch-size", type=positive_int, default=16)
        adapt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        adapt.set_defaults(func=cmd_adapt_batchnorm)

    batchnorm_arguments(commands.add_parser("adapt-batchnorm", help="re-estimate a model's BatchNorm statistics on "
                                                                    "untranscribed audio (test-time adaptation; "
                                                                    "weights unchanged)"))

    tta = commands.add_parser("adapt", help="test-time adaptation on untranscribed audio (SUTA; BatchNorm)")
    tta_commands = tta.add_subparsers(dest="adapt_command", required=True)
    suta = tta_commands.add_parser("suta", help="SUTA: each utterance transcribed after a few entropy + class-"
                                                "confusion minimisation steps on it alone, weights reset after each")
    suta.add_argument("--model", required=True, help=".nemo file or pretrained name")
    suta.add_argument("--manifest", required=True, help="the audio to transcribe (text optional: adds WER/CER)")
    suta.add_argument("--output-manifest", required=True, help="the manifest's rows with pred_text added")
    suta.add_argument("--steps", type=int, default=SUTA_DEFAULTS.steps,
                      help="adaptation steps per utterance (0: plain greedy)")
    suta.add_argument("--lr", type=float, default=SUTA_DEFAULTS.lr, help="AdamW learning rate")
    suta.add_argument("--temperature", type=float, default=SUTA_DEFAULTS.temperature,
                      help="softmax temperature of both losses")
    suta.add_argument("--em-weight", type=float, default=SUTA_DEFAULTS.em_weight,
                      help="weight of the entropy loss; 1 minus it weighs the class-confusion loss")
    suta.add_argument("--params", default=SUTA_DEFAULTS.params, choices=SUTA_PARAMS, help="parameters adapted")
    suta.add_argument("--weight-decay", type=float, default=SUTA_DEFAULTS.weight_decay, help="AdamW weight decay")
    suta.add_argument("--exclude-blank-frames", action=argparse.BooleanOptionalAction,
                      default=SUTA_DEFAULTS.exclude_blank_frames,
                      help="leave frames whose argmax is blank out of the entropy loss")
    suta.add_argument("--mcc-reweight", action=argparse.BooleanOptionalAction, default=SUTA_DEFAULTS.mcc_reweight,
                      help="weight frames by certainty in the class-confusion matrix, as SUTA's authors do")
    suta.add_argument("--batchnorm", default=SUTA_DEFAULTS.batchnorm, choices=["frozen", "train"],
                      help="BatchNorm statistics while adapting: running (frozen) or the utterance's own")
    suta.add_argument("--batch-size", type=positive_int, default=16,
                      help="clips per pass of the plain greedy comparison (SUTA adapts one utterance at a time)")
    suta.add_argument("--text-key", default="text")
    suta.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    suta.add_argument("--force", action="store_true", help="overwrite --output-manifest")
    suta.set_defaults(func=cmd_adapt_suta)
    batchnorm_arguments(tta_commands.add_parser("batchnorm", help="the same as rlnf adapt-batchnorm"))

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="synthesise a deterministic offline speech corpus (flite, espeak-ng)")
    synth.add_argument("--output", required=True, help="corpus folder (wav files + manifests)")
    synth.add_argument("--sentences", type=int, default=600, help="number of distinct sentences")
    synth.add_argument("--voices", default="flite:kal16,flite:awb,flite:slt,flite:rms",
                       help="comma-separated engine:voice list")
    synth.add_argument("--heldout-voice", default=None, help="engine:voice used only for the held-out split")
    synth.add_argument("--noise-snr", type=float, default=None, help="add white noise at this SNR (dB)")
    synth.add_argument("--voices-per-sentence", type=int, default=None,
                       help="each sentence is spoken by this many training voices (seeded); default: all")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)
    from rlnf.reward_model import pairs as scored_pairs  # light (no torch): its defaults are the one definition

    def listed(values) -> str:
        return ",".join(f"{value:g}" for value in values)

    pairs = data_commands.add_parser("pairs", help="scored pairs for train_reward_model: a policy's hypotheses of "
                                                   "labelled audio (and negatives), each scored 1 - CER")
    pairs.add_argument("--model", required=True, help="the policy: .nemo file or pretrained name")
    pairs.add_argument("--manifest", required=True, help="labelled manifest (audio_filepath, text)")
    pairs.add_argument("--output", required=True, help="the scored pairs, JSONL (written atomically)")
    pairs.add_argument("--limit", type=positive_int, default=None, help="at most this many clips, drawn with --seed "
                                                                        "(default: all)")
    pairs.add_argument("--temperatures", type=float_list, default=list(scored_pairs.DEFAULT_TEMPERATURES),
                       help=f"sampling temperatures, comma-separated (default: {listed(scored_pairs.DEFAULT_TEMPERATURES)})")
    pairs.add_argument("--samples-per-temperature", type=int, default=scored_pairs.DEFAULT_SAMPLES_PER_TEMPERATURE,
                       help=f"samples per clip at each temperature (default: {scored_pairs.DEFAULT_SAMPLES_PER_TEMPERATURE}; "
                            "the greedy transcript is always in)")
    pairs.add_argument("--error-rates", type=float_list, default=list(scored_pairs.DEFAULT_ERROR_RATES),
                       help="character error rates of the corrupted-reference negatives "
                            f"(default: {listed(scored_pairs.DEFAULT_ERROR_RATES)})")
    pairs.add_argument("--text-key", default="text", help="manifest field of the transcript")
    pairs.add_argument("--seed", type=int, default=0, help="clip draw, sampling and negatives (default: 0)")
    pairs.add_argument("--batch-size", type=positive_int, default=16)
    pairs.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pairs.add_argument("--force", action="store_true", help="replace --output if it exists")
    pairs.set_defaults(func=cmd_data_pairs)

    demo = commands.add_parser("demo", help="the offline end-to-end demo (corpus, policy, reward model, RL, report)")
    demo.add_argument("--output", default="demo_output", help="output folder (stages are cached there)")
    demo.add_argument("--minutes", type=float, default=15.0,
                      help="wall-clock budget: the time-boxed stages scale with it (default fits 2 CPU cores)")
    demo.add_argument("--fresh", action="store_true", help="ignore cached stages")
    demo.add_argument("--no-suta", dest="suta", action="store_false",
                      help="leave out the suta row (SUTA of the adapted start on the in-domain test set, about 1 minute)")
    demo.set_defaults(func=cmd_demo)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """'rlnf run rl_finetune', 'rlnf evaluate', ...: how an error message names the command."""
    words = ["rlnf", args.command]
    words += [word for word in (getattr(args, "recipe", None), getattr(args, "data_command", None),
                                          getattr(args, "adapt_command", None)) if word]
    return " ".join(words)


def write_error_log(command: str, exc: BaseException, folder: Path | None) -> Path:
    """The full trace of ``exc`` in ``folder`` (the run's output_dir when there is one), else in
    the temporary folder's ``rlnf-logs/``. Returns the log's path."""
    import tempfile
    import time
    import traceback

    name = f"rlnf-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"{command}\n{''.join(traceback.format_exception(exc))}"
    for candidate in ([folder] if folder else []) + [Path(tempfile.gettempdir()) / "rlnf-logs"]:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            (candidate / name).write_text(text, encoding="utf-8")
            return candidate / name
        except OSError:
            continue
    return Path(os.devnull)


def describe_unexpected(exc: BaseException) -> str:
    """One line: the exception's type and message, and the innermost source line it came from."""
    import traceback

    message = " | ".join(line for line in str(exc).splitlines() if line.strip())
    if len(message) > 300:
        message = message[:300] + "..."
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {message}{where}"


def closed_pipe() -> int:
    """The reader of stdout went away (``rlnf config rl_finetune | head``): stop quietly, as a Unix
    tool does. stdout is pointed at devnull so the interpreter's final flush cannot fail again
    (the Python docs' recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `run` takes key=value overrides anywhere after the recipe; nothing else is unknown.
        if getattr(args, "command", None) != "run" or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    setup_logging(args.verbose)
    args.log_dir = None  # cmd_run sets the run's folder: a crash's log goes there
    command = command_name(args)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return closed_pipe()
    except TrainingInterrupted as exc:
        print(f"rlnf: {exc}", file=sys.stderr)
        return 128 + signal.SIGINT
    except RlnfError as exc:
        # An error a user can fix. When it wraps an unexpected exception (training stopped by a
        # reward that raised, say), the full trace goes to a log file as well.
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, RlnfError):
            log_path = write_error_log(command, cause, args.log_dir)
            print(f"rlnf: error: {exc}\n(full trace: {log_path})", file=sys.stderr)
        else:
            print(f"rlnf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a raw traceback
        log_path = write_error_log(command, exc, args.log_dir)
        print(f"{command}: unexpected error: {describe_unexpected(exc)}; full trace in {log_path}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
