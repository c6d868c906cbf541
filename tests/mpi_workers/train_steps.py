"""Run under mpiexec: N expert-parallel training steps of a small LM; rank 0 writes each
step's metrics to OUT (JSON). tests/test_distributed.py runs the same steps in one process
and compares. Usage: train_steps.py CASES.json OUT.json"""
import json
import sys

from mpi4py import MPI

from moe_py.distributed import ExpertParallel
from moe_py.models import TransformerLM
from moe_py.optim import AdamW, lr_at
from moe_py.train import evaluate, train_step

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cases import EvalWindows, train_setup  # noqa: E402


def main() -> None:
    comm = MPI.COMM_WORLD
    parallel = ExpertParallel(comm)
    cases = json.load(open(sys.argv[1]))
    results = {}
    for name, case in cases.items():
        model_cfg, train_cfg, sampler = train_setup(case)
        model = TransformerLM(model_cfg)
        parallel.prepare(model)
        if "noise" in case:
            model.set_noise_annealing(*case["noise"])
        optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
        rows = []
        for step in range(case["steps"]):
            M = train_cfg.grad_accum
            batches = [sampler.batch(step * M + i) for i in range(M)]
            lr = lr_at(step, train_cfg.lr, train_cfg.warmup, train_cfg.steps, train_cfg.min_lr_ratio)
            m = train_step(model, batches, optim, lr, train_cfg, parallel)
            rows.append({k: m[k] for k in ("loss", "aux_loss", "grad_norm", "load_balance", "z_loss",
                                           "entropy", "expert_share", "drop_rate", "tokens")})
        # replicated weights must stay bit-identical on every rank
        same = True
        for n, p, _ in model.named_parameters():
            if n not in parallel.experts:
                ref = p.copy()
                comm.Bcast(ref, root=0)
                same &= bool((ref == p).all())
        evals = {str(n): evaluate(model, EvalWindows(sampler, n), None, parallel) for n in (1, 3)}
        results[name] = {"steps": rows, "replicated_identical": comm.allreduce(same, op=MPI.LAND),
                         "eval": evals}
    if comm.Get_rank() == 0:
        json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
