"""`dng bench gmm`."""

from __future__ import annotations

from dng.commands import SAMPLER_NAMES, add_renamed, check_count, check_memory, check_out_dir, check_seed, check_threads
from dng.errors import ConfigError

# `dng.bench.gmm.SCHEDULERS`, written out so that building the parser need not import diffusers.
SCHEDULERS = (*SAMPLER_NAMES, "flow-euler", "flow-euler-a")


def register(groups) -> None:
    p = groups["bench"].add_parser("gmm", help="guidance rules against the exact target on a Gaussian mixture")
    p.add_argument("--config", help="mixture JSON: means, stds, weights, remove (default: built-in d=64, K=10)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (1000 training steps)")
    p.add_argument("--scheduler", default="ddpm",
                   help=f"sampler: {', '.join(SCHEDULERS)}; the first four on a linear-beta DDPM schedule (DPM++ 2M "
                        "SDE Karras; DDIM with eta 1), flow-euler (FlowMatchEulerDiscreteScheduler with "
                        "stochastic_sampling) and flow-euler-a (Euler ancestral for rectified flow) on the "
                        "rectified-flow path with the exact velocity; default ddpm")
    p.add_argument("--shift", type=float, default=None, help="flow-euler's schedule shift (SD3: 3.0; default 1)")
    p.add_argument("--mu", type=float, default=None,
                   help="flow-euler with Flux's dynamic shifting at this mu (instead of --shift)")
    p.add_argument("--variance", default="fixed_large", choices=("fixed_large", "fixed_small"),
                   help="the DDPM sampler's step variance: beta_t (default) or the posterior's beta_tilde_t")
    p.add_argument("--num-images", dest="num_samples", type=int, default=4000,
                   help="samples per row (default %(default)s)")
    add_renamed(p, "--num-samples", "--num-images", "num_samples", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="none,np,sld,dng,dng-oracle,target",
                   help="comma-separated: none, np, sld, dng, dng-oracle, target")
    p.add_argument("--out", default="runs/gmm", help="folder for results.json and the figures (default runs/gmm)")
    p.add_argument("--plot", action="store_true", help="also write figures into --out")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows sampled in parallel processes (each with --threads torch threads; 2 on 2 cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from dng import plots
    from dng.bench.gmm import GMMBench, format_table, load_config, run_rows
    from dng.io import write_json

    check_count("--jobs", args.jobs)
    check_threads(args.threads)
    check_seed(args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty; give e.g. none,np,dng")
    out = check_out_dir(args.out)
    config = load_config(args.config)
    # A row keeps about 16 float64 vectors of the mixture's dimension per sample (noise, chain, branches, scores).
    check_memory("--num-images", args.num_samples, 16 * 8 * len(config["means"][0]), branches=0)
    bench = GMMBench(config, args.steps, args.num_samples, args.seed, args.variance, args.scheduler, args.shift,
                     args.mu)
    cells = list(bench.configs(methods))  # validates the methods before any sampling
    if args.threads:
        torch.set_num_threads(args.threads)
    keep = {"dng"} if args.plot else set()
    with tqdm(total=len(cells), desc="bench gmm", disable=None) as bar:
        results = run_rows(bench, methods, args.jobs, args.threads, keep_traces=keep, on_row=lambda: bar.update())
    rows = [row for row, _ in results]
    print(format_table(rows))
    result = {"config": config, "steps": args.steps, "scheduler": args.scheduler, "shift": args.shift, "mu": args.mu,
              "variance": args.variance, "num_samples": args.num_samples, "seed": args.seed, "rows": rows}
    print(f"wrote {write_json(out / 'results.json', result)}")
    if args.plot:
        print(f"wrote {plots.tradeoff(rows, out / 'tradeoff.png')}")
        for row, trace in results:
            if trace is not None:
                name = row["method"]
                print(f"wrote {plots.trajectories(trace, out / f'{name}_trajectories.png')}")
    return 0
