"""The ``glrnet`` command line: the parser, ``--plugin`` loading, and one error line per mistake."""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partialmethod

from tqdm import std as tqdm_std

from .. import __version__
from ..checkpoint import output_lock
from ..data import DataError
from ..experiments import packaged_specs
from ..robustness.settings import DEFAULT_EPS
from .commands import cmd_certify, cmd_datasets, cmd_evaluate, cmd_reproduce, cmd_robustness, cmd_train
from .options import Formatter as _Formatter
from .options import add_attack_options, add_data_options, add_train_options, seeds as _seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glrnet", formatter_class=_Formatter,
                                description="Train noisy networks by the generalized likelihood ratio method "
                                            "and measure their adversarial robustness.")
    p.add_argument("--version", action="version", version=f"glrnet {__version__}")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): the samplers, control variates, noise families, "
                        "perturbations, activations and losses it registers become choices of every command")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one model", formatter_class=_Formatter,
                       description="Train one noisy network (an MLP; a CNN with --arch; a spiking or recurrent network "
                                   "through time with --arch lif:H or rnn:H and --encoding) by GLR, back-propagation or a "
                                   "forward-only alternative; writes metrics.json, model.safetensors, history.csv, "
                                   "curves.png and a checkpoint per epoch.")
    add_train_options(t)
    t.add_argument("--out", default="runs/train", help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="OT and LAP accuracy of a trained run", formatter_class=_Formatter,
                       description="Test accuracy of a saved run: OT (noise off) and, for a model trained with "
                                   "noise, LAP (the average of K noisy passes). Prints JSON.")
    e.add_argument("--run", required=True, help="a run folder (or its model.safetensors)")
    add_data_options(e, required_dataset=True)
    e.add_argument("--lap-replications", type=int, default=1000, help="K for LAP")
    e.add_argument("--seed", type=int, default=0, help="seed of the LAP noise")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("datasets", help="list the datasets and where each is looked for", formatter_class=_Formatter,
                       description="List the datasets glrnet reads, where each is looked for, and whether it is "
                                   "available now.")
    d.add_argument("--cache-dir", default=None, help="download cache (default: $GLRNET_CACHE or ~/.cache/glrnet)")
    d.set_defaults(func=cmd_datasets)

    r = sub.add_parser("reproduce", help="run an experiment spec: the paper's tables, certified radii, the technique "
                       "study", formatter_class=_Formatter,
                       description="Run an experiment spec end to end: train its runs (finished runs are reused, "
                                   "interrupted ones resumed), then its analyses: the transfer tables (ε calibrated, "
                                   "FGSM transferred, tables, CSV and figures), certified radii, the technique study, "
                                   "and the adaptive-attack protocol.")
    r.add_argument("--spec", default=None, help="experiment spec: a TOML file, or the name of a packaged one "
                   f"({', '.join(packaged_specs())}); default: paper")
    r.add_argument("--seeds", type=_seeds, default=None, help="train and evaluate every model once per seed, "
                   "e.g. 0,1,2 (tables show mean and min–max); default: the spec's seeds, else each model's own")
    r.add_argument("--dataset", default=None, help="run only this [[datasets]] entry of the spec (its name or "
                   "dataset), e.g. one process per dataset into one --out")
    r.add_argument("--data-dir", default=None, help="the folder that holds one folder per dataset (mnist/, "
                   "fashion-mnist/, ...), e.g. ../shared/data (default: download into the cache)")
    r.add_argument("--quick", action="store_true", help="the packaged quick spec: the whole pipeline on digits "
                   "(about half a minute on 2 idle cores; --no-robustness skips the attacks); not with another --spec")
    r.add_argument("--no-robustness", action="store_true", help="skip the adaptive-attack evaluation")
    r.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    r.add_argument("--out", required=True, help="output folder of this spec's results (a rerun into it reuses "
                   "what is finished); a folder that holds anything else is refused")
    r.add_argument("--export", default=None, help="also copy the reports (tables, CSV, figures, spec; no weights) "
                   "to this folder, e.g. docs/results/mnist")
    r.add_argument("--quiet", action="store_true", help="less output")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser("certify", help="certified L2 radii of a trained noisy network", formatter_class=_Formatter,
                       description="CERTIFY (Cohen et al. 2019) for a run whose first noisy layer is linear or "
                                   "convolutional with Gaussian noise: per image the prediction or abstention and "
                                   "the certified L2 radius σ/‖W₁‖₂ · Φ⁻¹(p_A); certified accuracy at --radii; "
                                   "writes certify.csv, certify.md and certified_accuracy.png.")
    c.add_argument("--run", required=True, help="a run folder (or its model.safetensors)")
    add_data_options(c, required_dataset=True)
    c.add_argument("--images", type=int, default=500, help="test images certified")
    c.add_argument("--n0", type=int, default=100, help="noisy passes that select the class")
    c.add_argument("--samples", type=int, default=10000, help="noisy passes that bound its probability")
    c.add_argument("--alpha", type=float, default=0.001, help="1 − confidence of each bound")
    c.add_argument("--predictor", choices=["vote", "lap"], default="vote", help="majority vote or LAP")
    c.add_argument("--radii", default="0,0.25,0.5,1,1.5", help="L2 radii of the certified-accuracy table")
    c.add_argument("--seed", type=int, default=0, help="seed of the noise")
    c.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_certify)

    b = sub.add_parser("robustness", help="adaptive attacks on trained runs", formatter_class=_Formatter,
                       description="White-box adaptive attacks (APGD through several surrogate gradients, EOT, "
                                   "SPSA, transfer) on saved runs; writes robustness.md/.csv/_checks.json and a "
                                   "figure.")
    b.add_argument("--run", required=True, nargs="+", help="run folder(s) to attack")
    add_data_options(b, required_dataset=True)
    b.add_argument("--eps", default=",".join(f"{e:g}" for e in DEFAULT_EPS), help="comma-separated budgets ε (L∞, or L2 with --norm L2)")
    b.add_argument("--headline", type=float, default=None, help="ε of the transfer and convergence checks "
                   "(default: the middle of --eps)")
    b.add_argument("--source", default=None, help="a run folder of a network to transfer FGSM from")
    b.add_argument("--images", type=int, default=500, help="test images attacked")
    add_attack_options(b)
    b.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--resume", action="store_true", help="continue an interrupted run in --out: attacks recorded "
                   "in its robustness_journal.safetensors are replayed, the rest run")
    b.set_defaults(func=cmd_robustness)
    return p


def given_options(argv: list[str], command: str) -> set[str]:
    """The option names (dests) typed on the command line of ``command``, as argparse reads them
    (abbreviations included), as opposed to those left at their defaults."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


_PROGRESS_FOR_LOGS = False


def _progress_for_logs() -> None:
    """Progress bars redraw with a carriage return at every refresh: into a log file (stderr not a
    terminal) that is thousands of lines; there, they refresh once a minute."""
    global _PROGRESS_FOR_LOGS
    if _PROGRESS_FOR_LOGS or sys.stderr.isatty():
        return

    tqdm_std.tqdm.__init__ = partialmethod(tqdm_std.tqdm.__init__, mininterval=60.0)
    _PROGRESS_FOR_LOGS = True


def load_plugins(argv: list[str]) -> None:
    """Import the modules named by ``--plugin`` before the parser is built, so that what they register is
    among its choices."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
    names += [b for a, b in zip(argv, argv[1:]) if a == "--plugin"]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SystemExit(f"glrnet: error: --plugin {name}: cannot import it ({e})") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    load_plugins(argv)
    args = build_parser().parse_args(argv)
    _progress_for_logs()
    try:
        if args.command == "train":
            args.given = given_options(argv, "train")
        if args.command in ("certify", "robustness"):   # train takes its own lock (the library's)
            with output_lock(args.out):
                return args.func(args)
        return args.func(args)
    except (ValueError, DataError, FileNotFoundError, ImportError) as e:
        print(f"glrnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the step was refused, nothing was written
        print(f"glrnet {args.command}: error: {e}; the last checkpoint and outputs are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = {"train": "rerun with --resume", "robustness": "rerun with --resume: finished attacks are replayed",
                 "reproduce": "rerun the same command: finished models and attacks are reused and the interrupted "
                 "one resumes"}.get(args.command, "rerun the same command")
        print(f"glrnet {args.command}: interrupted; the last checkpoint and the results so far are kept ({again})",
              file=sys.stderr)
        return 130
