"""`dng bench gmm`."""

from __future__ import annotations

from dng.errors import ConfigError


def register(groups) -> None:
    p = groups["bench"].add_parser("gmm", help="guidance rules against the exact target on a Gaussian mixture")
    p.add_argument("--config", help="mixture JSON: means, stds, weights, remove (default: built-in d=64, K=10)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (DDPM, 1000 training steps)")
    p.add_argument("--variance", default="fixed_large", choices=("fixed_large", "fixed_small"),
                   help="the DDPM sampler's step variance: beta_t (default) or the posterior's beta_tilde_t")
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="none,np,sld,dng,dng-oracle,target",
                   help="comma-separated: none, np, sld, dng, dng-oracle, target")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--plot", help="write figures into this folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dng import plots
    from dng.bench.gmm import GMMBench, format_table, load_config
    from dng.io import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods is empty; give e.g. none,np,dng")
    config = load_config(args.config)
    bench = GMMBench(config, args.steps, args.num_samples, args.seed, args.variance)
    rows, traces = [], {}
    from tqdm.auto import tqdm

    cells = list(bench.configs(methods))
    for method, params, factory in tqdm(cells, desc="bench gmm", disable=None):
        row, trace = bench.run(method, params, factory)
        rows.append(row)
        if trace is not None and method == "dng":
            traces[method] = trace
    print(format_table(rows))
    result = {"config": config, "steps": args.steps, "variance": args.variance, "num_samples": args.num_samples,
              "seed": args.seed, "rows": rows}
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    if args.plot:
        print(f"wrote {plots.tradeoff(rows, f'{args.plot}/tradeoff.png')}")
        for name, trace in traces.items():
            print(f"wrote {plots.trajectories(trace, f'{args.plot}/{name}_trajectories.png')}")
    return 0
