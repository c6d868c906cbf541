"""Command line: `python -m moe_py <command>` (also the `moe-py` console script).

    train    train an MoE (or --dense) byte-level LM; writes a run folder
    compare  train the MoE and a dense baseline with the same active parameters
    sample   generate text from a checkpoint
    analyze  specialisation, utilisation and co-activation of a trained run
    analyze-hf  the same analysis of a local transformers MoE checkpoint
    ablate   validation loss without each expert, and as the least used are pruned
    upcycle  an MoE run folder from a dense run (sparse, granular and Drop-Upcycling)
    tournament  every router under identical conditions: run folders, one table, four plots
    runs     many run folders at a glance (--csv FILE)
    demo     route one padded batch through a fresh MoE layer
    info     version, compiler, BLAS and its core type, threads, CPU (for bug reports)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .config import (ACTIVATIONS, BALANCE_SCOPES, COMBINES, COMPUTE_DTYPES, DROP_POLICIES, DTYPES, GROUP_SCORES,
                     ROUTERS, MoEConfig)
from .flags import add_config_flags, config_from_args
from .layer import MoELayer
from .threads import set_num_threads


def _demo(args: argparse.Namespace) -> int:
    """Route one padded batch through a fresh layer and print what the router did."""
    cfg = config_from_args(MoEConfig, args)
    layer = MoELayer(cfg)
    rng = np.random.default_rng(args.seed)
    B, S = 4, 64
    x = rng.standard_normal((B, S, cfg.d_model)).astype(cfg.np_dtype)
    lengths = rng.integers(S // 2, S + 1, size=B)
    mask = np.arange(S)[None, :] < lengths[:, None]
    ids = rng.integers(0, 256, (B, S)) if cfg.traits.needs_token_ids else None  # random byte ids
    out = layer(x, padding_mask=mask, token_ids=ids)
    r = out.router
    assert r is not None  # a MoELayer always routes
    real = mask.reshape(-1)
    E = cfg.num_experts
    print(f"MoE layer: router={cfg.router} d_model={cfg.d_model} d_ff={cfg.d_ff} E={E} "
          f"k={cfg.top_k} capacity_factor={cfg.capacity} activation={cfg.activation}")
    print(f"tokens: {real.size} ({int(real.sum())} real, {int((~real).sum())} padding)")
    share = r.tokens_per_expert / max(1, r.tokens_per_expert.sum())
    print("tokens_per_expert:", r.tokens_per_expert.tolist())
    print("share per expert: ", " ".join(f"{s:.3f}" for s in share), f"(uniform {1 / E:.3f})")
    print(f"mean clean entropy: {r.entropy[real].mean():.4f} nats (max ln E = {np.log(E):.4f})")
    print(f"dropped slots: {int(r.dropped.sum())} of {int(((r.topk_indices >= 0) & real[:, None]).sum())}")
    print("losses:", {k: round(v, 6) for k, v in out.losses.items()}, f"aux_loss={out.aux_loss:.6f}")
    print("first token: experts", r.topk_indices[0].tolist(),
          "weights", np.round(r.topk_weights[0], 4).tolist())
    dx = layer.backward(np.ones_like(out.y))
    print(f"backward: |dx|={np.linalg.norm(dx):.4f} (padding rows zero: "
          f"{bool(np.all(dx.reshape(-1, cfg.d_model)[~real] == 0))}); grad norms",
          {k: round(float(np.linalg.norm(g)), 4) for k, g in layer.grads.items()})
    return 0


def _info(args: argparse.Namespace) -> int:
    from .machine import blas_is_generic, build_info, format_build_info
    info = build_info()
    print(format_build_info(info))
    if blas_is_generic(str(info["blas_corename"]), str(info["cpu_simd"]).split()):
        print(f"WARNING: OpenBLAS runs generic '{info['blas_corename']}' kernels on this CPU")
    return 0


# ---- train / compare ---------------------------------------------------------------

# Which fields of each config the train/compare flags set. The rest are derived:
# ModelConfig.max_seq_len = seq_len, its d_ff (dense width) = top_k * d_ff +
# num_shared_experts * shared_d_ff (the same active FFN parameters per token as k routed
# experts and the shared ones), and MoEConfig's d_model/activation/dtype/seed and the
# model's seed come from the model and training flags.
MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "activation", "n_predict", "dtype", "first_dense",
               "moe_every")
MOE_FLAGS = ("num_experts", "top_k", "d_ff", "swiglu_alpha", "swiglu_limit", "ffn_bias", "combine", "router", "normalize_topk", "capacity_factor", "drop_policy",
             "straight_through", "load_balance_coef", "z_loss_coef", "entropy_coef",
             "load_balance_scope", "routed_scaling_factor", "bias_update_rate", "n_group",
             "topk_group", "sinkhorn_iterations", "sinkhorn_tolerance", "router_bias", "group_score",
             "topk_norm_min", "num_shared_experts", "shared_d_ff", "compute_dtype")
TRAIN_FLAGS = ("corpus", "corpus_bytes", "steps", "batch_size", "seq_len", "grad_accum", "lr",
               "warmup", "lr_decay_steps", "min_lr_ratio", "weight_decay", "grad_clip",
               "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "noise_std",
               "noise_anneal_steps", "seed", "split_seed", "collapse_low_share", "collapse_max_over_mean",
               "collapse_steps")
# Short names kept from earlier versions of the CLI.
ALIASES = {"n_layers": ["--layers"], "n_heads": ["--heads"], "num_experts": ["--experts"]}
CHOICES = {"activation": ACTIVATIONS, "dtype": tuple(DTYPES), "router": ROUTERS, "combine": COMBINES,
           "drop_policy": DROP_POLICIES, "load_balance_scope": BALANCE_SCOPES, "group_score": GROUP_SCORES,
           "compute_dtype": [d for d in COMPUTE_DTYPES if d is not None]}


# The MoE fields upcycle takes (the experts' shape comes from the dense run; docs/design.md,
# "Upcycling a dense run").
UPCYCLE_MOE_FLAGS = ("router", "normalize_topk", "capacity_factor", "drop_policy", "load_balance_coef",
                     "z_loss_coef", "entropy_coef", "load_balance_scope", "routed_scaling_factor",
                     "bias_update_rate")


def _add_model_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    from .models import ModelConfig
    from .train import TrainConfig
    add_config_flags(p.add_argument_group("model"), ModelConfig, MODEL_FLAGS, ALIASES, CHOICES)
    add_config_flags(p.add_argument_group("router and experts"), MoEConfig, MOE_FLAGS, ALIASES,
                     CHOICES)
    add_config_flags(p.add_argument_group("training"), TrainConfig,
                     [f for f in TRAIN_FLAGS if f not in exclude], ALIASES, CHOICES)


def _new_run_dir(kind: str) -> str:
    """runs/<date>-<time>-<kind>, new for every run that names no --out."""
    import datetime
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{stamp}-{kind}")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join("runs", f"{stamp}-{kind}-{n}")
    return path


def _check_resume_flags(args: argparse.Namespace, saved: dict) -> None:
    """On --resume only --steps may change: any other flag given must match the run."""
    model, moe, train = saved["model"], saved["model"].get("moe") or {}, saved["train"]
    for dest in sorted(args.explicit):
        if dest in ("steps", "out", "resume", "overwrite", "threads", "command", "func", "explicit",
                    "expert_parallel", "trace_routing", "tensorboard", "log_every", "quiet"):
            continue
        have: object  # what the saved run has for the flag
        if dest == "dense":
            have = saved["model"].get("moe") is None
        elif dest in MODEL_FLAGS:
            have = model.get(dest)
        elif dest in MOE_FLAGS:
            have = moe.get(dest)
        else:
            have = train.get(dest)
        given = getattr(args, dest)
        if given is not None and given != have:
            raise ValueError(f"--{dest.replace('_', '-')}: the run in {args.out} was made with "
                             f"{have!r}, not {given!r}; on --resume only --steps may change")


def _absolute_corpus(corpus: str) -> str:
    """A corpus of files as absolute paths, so that the run folder can be analysed and resumed
    from any working directory; the built-in names as they are."""
    if corpus in ("python", "synthetic"):
        return corpus
    return ",".join(os.path.abspath(p) for p in corpus.split(",") if p)


def configs_from_args(args: argparse.Namespace, dense: bool):
    """The (ModelConfig, TrainConfig) that parsed `train` flags describe (dense: no MoE layers,
    an FFN as wide as the MoE's active width); benchmarks build their runs through it."""
    from .models import ModelConfig
    from .train import TrainConfig
    args.corpus = _absolute_corpus(args.corpus)
    shared = dict(d_model=args.d_model, activation=args.activation, dtype=args.dtype, seed=args.seed)
    moe = config_from_args(MoEConfig, args, **shared)
    model = config_from_args(ModelConfig, args, max_seq_len=args.seq_len, d_ff=moe.active_ffn_width,
                             moe=None if dense else moe, seed=args.seed)
    return model, config_from_args(TrainConfig, args)


def _plot(run_dir: str) -> None:
    from .plots import plot_run
    plot_run(run_dir)


def _train(args: argparse.Namespace) -> int:
    """The train command; under `mpiexec -n P ... --expert-parallel`, every rank runs it and
    rank 0 alone prints, plots and writes the run folder."""
    from .parallel import SingleProcess
    from .train import train
    from .distributed.comm import mpi_ranks_from_launcher  # reads the environment only
    if args.expert_parallel:
        from .distributed import ExpertParallel
        parallel = ExpertParallel()
        try:
            return _train_with(args, train, parallel)
        except Exception as e:  # noqa: BLE001 - a failure on one rank must end every rank
            return _abort_ranks(e, parallel)
    if mpi_ranks_from_launcher() > 1:
        raise ValueError(f"expert_parallel: started by mpiexec with {mpi_ranks_from_launcher()} ranks "
                         "but without --expert-parallel: every rank would train the same run into "
                         "one folder")
    return _train_with(args, train, SingleProcess())


def _train_with(args: argparse.Namespace, train, parallel) -> int:
    root = parallel.is_root
    if args.out is None:
        if args.resume:
            raise ValueError("out: --resume needs the run folder to continue (--out)")
        # one name for every process: the root's clock decides
        args.out = parallel.broadcast(_new_run_dir("dense" if args.dense else args.router) if root else None)
        if root:
            print(f"run folder: {args.out}", file=sys.stderr)
    # TensorBoard's view of the metrics (root only); the extra is checked before training
    tb = _tensorboard_log(args.out) if args.tensorboard and root else None
    if args.resume:
        from .models import ModelConfig
        from .run_folder import RunFolder
        from .train import TrainConfig
        folder = RunFolder(args.out)
        saved = folder.read_config()
        _check_resume_flags(args, saved)
        model_cfg = ModelConfig.from_dict(saved["model"], f"run folder: {folder.config}: model")
        train_cfg = TrainConfig.from_dict(saved["train"], f"run folder: {folder.config}: train")
        if "steps" in args.explicit:
            train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
        last = train(model_cfg, train_cfg, args.out, resume=True, parallel=parallel,
                     trace_routing=args.trace_routing, **_progress_kw(args, tb))
    else:
        model_cfg, train_cfg = configs_from_args(args, dense=args.dense)
        last = train(model_cfg, train_cfg, args.out, overwrite=args.overwrite, parallel=parallel,
                     trace_routing=args.trace_routing, **_progress_kw(args, tb))
    if tb is not None:
        tb.close()
    if not root:
        return 0
    _plot(args.out)
    if not last:
        print(f"nothing to do: the run in {args.out} is already at step {train_cfg.steps} "
              "(--steps extends it)")
        return 0
    where = parallel.describe(model_cfg)
    print(f"done: step {last['step']} loss {last['loss']:.4f} "
          f"val_loss {last.get('val_loss', float('nan')):.4f}; run folder {args.out}"
          + (f" ({where})" if where else ""))
    return 0


def _tensorboard_log(run_dir: str):
    from .tensorboard_log import TensorBoardLog
    return TensorBoardLog(run_dir)


def _progress_kw(args: argparse.Namespace, on_step=None) -> dict:
    """train()'s progress arguments from --quiet and --log-every (moe_py/progress.py)."""
    return dict(quiet=args.quiet, log_every=args.log_every, on_step=on_step)


def _log_every(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def _add_progress_flags(p: argparse.ArgumentParser) -> None:
    """--log-every and --quiet: how train, compare and tournament show their progress."""
    from .progress import LOG_EVERY
    p.add_argument("--log-every", type=_log_every, default=LOG_EVERY, metavar="N",
                   help="when stderr is not a terminal (a log file, | tee, a notebook): one plain "
                        "progress line every N steps instead of a bar; 0: only the last "
                        f"(default: {LOG_EVERY}, the default --eval-every)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (no bar, no lines)")


def _abort_ranks(e: Exception, parallel) -> int:
    """Print a rank's failure as main() would, then end the whole MPI job: the other ranks
    may be waiting in a collective this one will never join."""
    import time
    told = _failure(e)
    if told is None:
        raise e
    msg, code = told
    print(msg if parallel.is_root or parallel.size == 1 else f"[rank {parallel.rank}] {msg}", file=sys.stderr)
    if parallel.size > 1:
        # mpiexec forwards each rank's stderr asynchronously and an abort can drop what is
        # still in flight (seen under load): the message gets a moment to arrive first
        sys.stderr.flush()
        time.sleep(1.0)
        parallel.comm.Abort(code)
    return code


def _compare(args: argparse.Namespace) -> int:
    from .compare import format_compare, run_compare
    if args.out is None:
        args.out = _new_run_dir("compare")
        print(f"run folder: {args.out}", file=sys.stderr)
    if args.lr_grid is not None and "lr" in args.explicit:
        raise ValueError("lr_grid: give --lr or --lr-grid, not both")
    args.seed = 0  # each run's seed is set by compare (0 .. seeds-1)
    model_cfg, train_cfg = configs_from_args(args, dense=False)
    result = run_compare(args.out, model_cfg, train_cfg, seeds=args.seeds, lr_grid=args.lr_grid,
                         tune_seed=args.tune_seed, overwrite=args.overwrite, progress=not args.quiet,
                         log_every=args.log_every)
    print(format_compare(result))
    print(f"wrote {os.path.join(args.out, 'compare.json')} and compare.png; runs in {args.out}/<arm>/seed-<s>")
    return 0


# The tournament's entries set the router fields themselves, and it runs seeds 0 .. N-1 with
# its own --steps default, so it takes the model's shape and the schedule only.
TOURNAMENT_MOE_FLAGS = ("num_experts", "top_k", "d_ff", "capacity_factor", "drop_policy", "z_loss_coef", "compute_dtype")
TOURNAMENT_TRAIN_FLAGS = tuple(f for f in TRAIN_FLAGS
                               if f not in ("steps", "seed", "noise_std", "noise_anneal_steps"))


def _lr_grid(text: str) -> List[float]:
    from .tournament.run import check_lr_grid
    try:
        grid = check_lr_grid([float(v) for v in text.split(",") if v.strip()])
        assert grid is not None  # None only for None, and it was given a list
        return grid
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated, distinct, positive learning "
                                         f"rates, got {text!r}") from None


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """--seeds, --lr-grid and --tune-seed: what compare and tournament share."""
    from .tournament import DEFAULT_SEEDS as seeds_default, TUNE_SEED
    p.add_argument("--seeds", type=int, default=seeds_default,
                   help=f"seeds per arm, 0 .. N-1: each sets the weights and the batch order, never "
                        f"the validation split (--split-seed) (default: {seeds_default})")
    p.add_argument("--lr-grid", type=_lr_grid, default=None, metavar="A,B,C",
                   help="tune the learning rate per arm: each arm trains once per rate at --tune-seed "
                        "and its seeds use the rate with the lowest validation loss (default: --lr "
                        "for every arm)")
    p.add_argument("--tune-seed", type=int, default=TUNE_SEED,
                   help=f"seed of the --lr-grid tuning runs, not one of the compared seeds "
                        f"(default: {TUNE_SEED})")
    _add_progress_flags(p)


def _add_tournament_flags(p: argparse.ArgumentParser) -> None:
    from .models import ModelConfig
    from .tournament import DEFAULT_STEPS, ENTRY_NAMES
    from .train import TrainConfig
    p.add_argument("--out", required=True, help="folder of the tournament: one run folder per "
                   "entry and seed (DIR/<entry>/seed-<s>), the table and the plots")
    p.add_argument("--routers", nargs="+", default=None, metavar="ENTRY",
                   help=f"the entries to run (default: all): {', '.join(ENTRY_NAMES)}")
    _add_comparison_flags(p)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimiser steps of every run (default: {DEFAULT_STEPS})")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain runs already in --out (default: keep complete runs, resume "
                        "interrupted ones)")
    add_config_flags(p.add_argument_group("model"), ModelConfig, MODEL_FLAGS, ALIASES, CHOICES)
    add_config_flags(p.add_argument_group("experts (each entry sets its router fields)"), MoEConfig,
                     TOURNAMENT_MOE_FLAGS, ALIASES, CHOICES)
    add_config_flags(p.add_argument_group("training"), TrainConfig, TOURNAMENT_TRAIN_FLAGS, ALIASES,
                     CHOICES)


def _tournament(args: argparse.Namespace) -> int:
    import time
    from .tournament import run_tournament
    from .tournament.table import table_markdown
    t0 = time.perf_counter()
    if args.lr_grid is not None and "lr" in args.explicit:
        raise ValueError("lr_grid: give --lr or --lr-grid, not both")
    args.seed = 0  # each run's seed is set by the tournament (0 .. seeds-1)
    base_model, base_train = configs_from_args(args, dense=False)
    table = run_tournament(args.out, routers=args.routers, seeds=args.seeds, base_model=base_model,
                           base_train=base_train, overwrite=args.overwrite, lr_grid=args.lr_grid,
                           tune_seed=args.tune_seed, progress=not args.quiet, log_every=args.log_every)
    print(table_markdown(table))
    done = list(table["actions"].values())
    print(f"runs: {done.count('trained')} trained, {done.count('resumed')} resumed, "
          f"{done.count('kept')} complete already; {time.perf_counter() - t0:.0f} s")
    print(f"wrote {os.path.join(args.out, 'tournament.md')}, tournament.json and "
          f"{len(table['plots'])} plots")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from .run_folder import atomic_write
    from .runs_table import format_runs, runs_csv, runs_table
    rows = runs_table(args.dirs)
    print(format_runs(rows))
    if args.csv:
        atomic_write(args.csv, runs_csv(rows).encode())
        print(f"wrote {args.csv}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .sample import generate
    from .run_folder import resolve_checkpoint
    model, _ = load_model(resolve_checkpoint(args.checkpoint))
    text = generate(model, args.prompt.encode("utf-8"), args.length, args.temperature, args.seed)
    sys.stdout.write(text.decode("utf-8", errors="replace") + "\n")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .ablation import ablate_run
    from .plots import plot_ablation
    res = ablate_run(args.run_dir, max_batches=args.batches, renormalize=not args.no_renormalize)
    deltas = np.asarray(res["deltas"])
    print(f"val loss {res['val_loss']:.4f} at step {res['step']} ({res['batches']} batches); "
          f"change when one expert is removed ({'renormalised' if res['renormalize'] else 'not renormalised'}):")
    print(f"{'layer':<6}" + "".join(f"{'e' + str(e):>8}" for e in range(deltas.shape[1])))
    for i, row in enumerate(deltas):
        print(f"{i:<6}" + "".join(f"{v:>+8.4f}" for v in row))
    print("pruning the least used experts of every MoE layer:")
    for p in res["pruning"]:
        print(f"  {p['kept']:>3} experts kept  val loss {p['val_loss']:.4f}")
    for path in plot_ablation(res["run"], res):
        print(f"wrote {path}")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from .upcycle import upcycle_run, val_loss_line
    out = args.out if args.out is not None else _new_run_dir("upcycled")
    moe = {f: getattr(args, f) for f in UPCYCLE_MOE_FLAGS}
    rec = upcycle_run(args.dense_run, out, args.num_experts, args.granularity, args.reinit_fraction,
                      top_k=args.top_k, seed=args.seed, steps=args.steps, moe=moe, overwrite=args.overwrite)
    print(val_loss_line(rec))
    print(f"upcycled {rec['parent']} (step {rec['parent_step']}): {rec['num_experts']} experts, "
          f"top_k {rec['top_k']}, granularity {rec['granularity']}, {rec['units_reinit_per_expert']} "
          f"units re-initialised per expert; run folder {out} at step 0; train it on with: "
          f"python -m moe_py train --out {out} --resume")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .report import analyze_run
    res = analyze_run(args.run_dir, max_batches=args.batches)
    print(res["corpus_summary"])
    if args.over_training:
        from .report import analyze_over_training
        rows = analyze_over_training(args.run_dir, max_batches=args.batches)
        print("over training (normalised MI per layer; share of tokens whose top-k set, and "
              "whose top-1 expert, changed since the previous checkpoint):")
        for r in rows:
            print(f"  step {r['step']:>6}  MI {' '.join(f'{v:.3f}' for v in r['mi'])}"
                  f"  changed {' '.join(f'{v:.3f}' for v in r['changed_since_previous'])}"
                  f"  top-1 {' '.join(f'{v:.3f}' for v in r['top1_changed_since_previous'])}")
    print(f"analysed {res['tokens']:,} validation tokens of {res['corpus']} at step {res['step']}")
    _print_analysis(res, args.run_dir)
    return 0


def _analyze_hf(args: argparse.Namespace) -> int:
    from .hf.analyze import analyze_hf
    res = analyze_hf(args.model_dir, args.corpus, args.out, batches=args.batches, seq_len=args.seq_len,
                     batch_size=args.batch_size, init=not args.skip_init)
    print(res["corpus_summary"])
    print(f"analysed {res['tokens']:,} tokens of {res['corpus']} through {res['architecture']} "
          f"({len(res['layers'])} MoE layers; router scores: {', '.join(sorted(set(res['score_functions'])))})")
    _print_analysis(res, args.out)
    return 0


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _print_analysis(res: dict, out_dir: str) -> None:
    """The table of analysis.json that `analyze` and `analyze-hf` print."""
    lab = res["label_given_byte"][0]
    print(f"the byte alone fixes {100 * lab['byte_label_mi']:.0f} % of the label's entropy "
          f"(I(byte; label) / H(label)); H(label | byte) = {lab['label_entropy_given_byte']:.3f} nats")
    print(f"{'layer':<6} {'mi':>6} {'byte null [5-95 %]':>20} {'at init':>8} {'first ch.':>9} "
          f"{'its null':>8} {'mi|byte':>8} {'floor [5-95 %]':>21} {'beyond':>6} {'max/mean':>9} {'eff. exp.':>9}")
    for i, layer in enumerate(res["layers"]):
        null, floor = layer["mi_byte_null"], layer["mi_given_byte_floor"]
        print(f"{i:<6} {layer['mi']:>6.3f} {null['mean']:>6.3f} [{null['p5']:.3f}, {null['p95']:.3f}] "
              f"{_num(layer['mi_at_init'], '>8.3f'):>8} {layer['mi_first_choice']:>9.3f} "
              f"{null['first_choice']['mean']:>8.3f} {layer['mi_given_byte']:>8.4f} "
              f"{floor['mean']:>6.4f} [{floor['p5']:.4f}, {floor['p95']:.4f}] "
              f"{'yes' if layer['beyond_byte'] else 'no':>6} {layer['imbalance']['max_over_mean']:>9.3f} "
              f"{layer['entropy']['effective_experts']:>9.2f}")
    print("mi: MI(expert; label) / H(label) over all top-k slots; byte null: the same for random "
          "byte -> expert tables giving each token as many experts; first ch.: first choices only; "
          "mi|byte: MI(expert; label | byte) / H(label | byte), against experts shuffled within each byte; "
          "beyond: mi|byte above the floor's mean by more than its 5-95 % width "
          "(with a tokenizer, 'byte' is the token id)")
    for i, layer in enumerate(res["layers"][:-1]):
        co = layer["cooccurrence_to_next"]
        print(f"layers {i} -> {i + 1}: co-occurrence MI(top-k set; next top-k set) / H = {co['mi']:.4f}, "
              f"shuffled tokens {co['mi_shuffled']['mean']:.4f} [{co['mi_shuffled']['p5']:.4f}, "
              f"{co['mi_shuffled']['p95']:.4f}]{' (above the null)' if co['above_null'] else ''}")
    print("top trigrams per expert (ending at the tokens it takes most often):")
    for i, layer in enumerate(res["layers"]):
        for e, grams in layer.get("top_trigrams", {}).items():
            shown = ", ".join(f"{g!r} {c}" for g, c in grams[:3])
            print(f"  layer {i} expert {e}: {shown}")
    print(f"wrote {os.path.join(out_dir, 'analysis.json')} and plots")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="moe_py", description="A Mixture-of-Experts laboratory for the CPU.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"moe_py {__version__}")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads for the kernels")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", allow_abbrev=False, help="route one padded batch through a fresh MoE layer")
    add_config_flags(d, MoEConfig, [f.name for f in dataclasses.fields(MoEConfig)], ALIASES, CHOICES)
    d.set_defaults(func=_demo)

    i = sub.add_parser("info", allow_abbrev=False, help="version, compiler, BLAS, threads and CPU, for bug reports")
    i.set_defaults(func=_info)

    t = sub.add_parser("train", allow_abbrev=False, help="train a byte-level MoE language model")
    _add_model_flags(t)
    t.add_argument("--dense", action="store_true", help="dense baseline: FFN width top_k * d_ff")
    t.add_argument("--out", default=None,
                   help="run folder (default: a new runs/<date>-<time>-<router> for every run)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (--steps extends it)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _add_progress_flags(t)
    t.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics and per-layer load histograms to OUT/tensorboard/ "
                        "(the tensorboard extra; not part of the run's config)")
    t.add_argument("--trace-routing", action="store_true",
                   help="write every token's experts per step and MoE layer to OUT/routing_trace.jsonl "
                        "(moe_py/routing_trace.py; replayable)")
    t.add_argument("--expert-parallel", action="store_true",
                   help="under mpiexec -n P: experts split over the P ranks, the rest data parallel "
                        "(needs the mpi extra; P must divide --num-experts)")
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", allow_abbrev=False,
                       help="MoE vs a dense baseline with the same active parameters, over seeds")
    _add_model_flags(c, exclude=("seed",))
    _add_comparison_flags(c)
    c.add_argument("--out", default=None,
                   help="folder for the runs, OUT/<arm>/seed-<s> (default: a new runs/<date>-<time>-compare)")
    c.add_argument("--overwrite", action="store_true",
                   help="retrain runs already there (default: keep complete runs, resume interrupted ones)")
    c.set_defaults(func=_compare)

    a = sub.add_parser("analyze", allow_abbrev=False, help="what the experts of a trained run learned")
    a.add_argument("run_dir", help="a run folder written by train (its latest checkpoint), or "
                                  "one of its checkpoints")
    a.add_argument("--over-training", action="store_true",
                   help="also route the sample through every kept checkpoint: specialisation "
                        "and routing stability across training")
    _add_batches_flag(a)
    a.set_defaults(func=_analyze)

    h = sub.add_parser("analyze-hf", allow_abbrev=False,
                       help="the routing analysis of a local transformers MoE checkpoint")
    h.add_argument("model_dir", help="a save_pretrained folder (read locally; nothing is downloaded)")
    h.add_argument("--corpus", required=True,
                   help="python | synthetic | text files or folders (comma-separated), labelled as for train")
    h.add_argument("--out", required=True, help="folder for analysis.json and the plots")
    h.add_argument("--batches", type=int, default=8, help="batches to route (a systematic sample of the corpus)")
    h.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    h.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    h.add_argument("--skip-init", action="store_true",
                   help="do not route through the freshly initialised architecture (the *_at_init keys are null)")
    h.set_defaults(func=_analyze_hf)

    tr = sub.add_parser("tournament", allow_abbrev=False,
                        help="every router trained under identical conditions; one table, four plots")
    _add_tournament_flags(tr)
    tr.set_defaults(func=_tournament)

    ab = sub.add_parser("ablate", allow_abbrev=False,
                        help="validation loss without each expert, and as the least used are pruned")
    ab.add_argument("run_dir", help="a run folder written by train (its latest checkpoint)")
    _add_batches_flag(ab)
    ab.add_argument("--no-renormalize", action="store_true",
                    help="keep the full router's weights for the experts left (default: renormalise "
                         "them over the experts left)")
    ab.set_defaults(func=_ablate)

    up = sub.add_parser("upcycle", allow_abbrev=False,
                        help="an MoE run folder (step 0) from a dense run: its FFNs copied or split into experts")
    up.add_argument("dense_run", help="a run folder written by train --dense (its latest checkpoint)")
    up.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer (E)")
    up.add_argument("--granularity", type=int, default=1,
                    help="split each FFN copy into g experts of width d_ff / g (default: 1)")
    up.add_argument("--reinit-fraction", type=float, default=0.0,
                    help="Drop-Upcycling: re-initialise this share of each expert's hidden units (default: 0)")
    up.add_argument("--top-k", type=int, default=None,
                    help="experts per token (default: granularity: the dense parent's active FLOPs)")
    up.add_argument("--out", default=None, help="run folder (default: a new runs/<date>-<time>-upcycled)")
    up.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    up.add_argument("--seed", type=int, default=None,
                    help="seed of the re-initialised units and of the new run's batch order "
                         "(default: the dense run's)")
    up.add_argument("--steps", type=int, default=None,
                    help="the upcycled run's steps, which fix its schedule (default: the dense run's)")
    add_config_flags(up.add_argument_group("router"), MoEConfig, UPCYCLE_MOE_FLAGS, ALIASES, CHOICES)
    up.set_defaults(func=_upcycle)

    r = sub.add_parser("runs", allow_abbrev=False, help="one row per run folder: router, seeds, val loss, "
                       "specialisation, imbalance, and the config fields that differ")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="run folders, or folders holding them")
    r.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    r.set_defaults(func=_runs)

    s = sub.add_parser("sample", allow_abbrev=False, help="generate text from a checkpoint")
    s.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint .npz")
    s.add_argument("--prompt", default="def ")
    s.add_argument("--length", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)
    return p


def _add_batches_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, default=None,
                   help="validation batches to route (default: the run's eval_batches, the sample "
                        "behind its val_loss)")


def _explicit_dests(parser: argparse.ArgumentParser, argv: List[str], command: str) -> set:
    """The dests of the options the user typed (abbreviations are off, so names are exact)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {act.dest for act in sub.choices[command]._actions
            if any(o in typed for o in act.option_strings)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = _explicit_dests(parser, sys.argv[1:] if argv is None else argv, args.command)
    try:
        if args.threads is not None:
            set_num_threads(args.threads)
        return args.func(args)
    except BaseException as e:  # noqa: BLE001 - the failures _failure tells in one line; others re-raised
        told = _failure(e)
        if told is None:
            raise
        print(told[0], file=sys.stderr)
        return told[1]


def _failure(e: BaseException) -> Optional[Tuple[str, int]]:
    """The one-line message and exit code of a failure the CLI reports without a traceback
    (None: any other, which keeps its traceback)."""
    from .interrupts import TrainingInterrupted
    from .train import TrainingDiverged
    if isinstance(e, (TrainingDiverged, TrainingInterrupted)):
        return f"moe_py: {e}", 1 if isinstance(e, TrainingDiverged) else 130
    if isinstance(e, KeyboardInterrupt):
        return "moe_py: interrupted", 130
    if isinstance(e, (ValueError, TypeError, OSError, KeyError, RuntimeError)):
        return f"moe_py: error: {e}", 2
    if isinstance(e, MemoryError):
        return ("moe_py: error: out of memory: try a smaller --batch-size, --seq-len, --d-model, "
                "--d-ff or --num-experts", 2)
    return None
