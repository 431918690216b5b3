"""Rebuild the parity fixtures (tests/data/official/*.pt) from local clones of the methods' authors' code.

    python tools/official_fixtures.py --repos DIR [--out tests/data/official] [--only NAME ...]

Each fixture holds what the authors' code computed on fixed inputs with a tiny float64 network (inputs, the
network's weights, per-sample targets and weights, losses, gradients, many draws of their time / level samplers,
their sampler's output) and its provenance (repository, commit, file, function, what was patched). The tests
(tests/test_official_parity_*.py) read only these files; CI never runs this tool. No line of the authors' code is
in this project: each group below imports it from the clones under --repos at run time and replaces only its random
draws and the plumbing the pieces never use (logging, data, devices), by stubs.

    group      fixtures                          clones under --repos (each group's docstring: commits, maps)
    meanflow   meanflow imf pmf                  meanflow (Gsunshine), imeanflow and pMF (Lyy-iiis)
    cm         cm scm dmd2                       consistency_models (openai), kinyugo_consistency_models, FastGen
                                                 (NVlabs), DMD2 (tianweiy)
    ctm        ctm_* ld3_* pd                    ctm (sony), LD3 (vinhsuhi), google-research-dd (diffusion_distillation)
    shortcut   shortcut_* rf_* reflow_*          shortcut-models (kvfrans), RectifiedFlow (gnobitab), minRF

The authors' code needs what the project does not: jax with float64 on the CPU, flax, absl, ml_collections,
omegaconf and a CPU torch; run this in a scratch environment (`pip install "jax[cpu]" flax ...`), not the project's.
"""
import argparse
import importlib
import pathlib
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
GROUPS = ("meanflow", "cm", "ctm", "shortcut")


def generators(group):
    """{fixture name: fn(repos) -> dict} of one group (tools/official_fixtures_<group>.py)."""
    sys.path.insert(0, str(HERE))
    return importlib.import_module(f"official_fixtures_{group}").GENERATORS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", type=pathlib.Path, required=True, help="folder of the authors' clones")
    p.add_argument("--out", type=pathlib.Path, default=HERE.parent / "tests" / "data" / "official")
    p.add_argument("--only", nargs="*", metavar="NAME", help="these fixtures only (default: all)")
    p.add_argument("--group", choices=GROUPS, help="run one group in this process (the default runs each group in "
                                                   "a process of its own: two clones hold a package named cm)")
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - {n for g in GROUPS for n in generators(g)}
    if unknown:
        p.error(f"--only: no fixture named {', '.join(sorted(unknown))}")
    if args.group is None:
        for group in GROUPS:
            subprocess.run([sys.executable, __file__, "--group", group, "--repos", str(args.repos), "--out",
                            str(args.out), *(["--only", *args.only] if args.only else [])], check=True)
        return
    gens = generators(args.group)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [n for n in gens if not args.only or n in args.only]:
        torch.save(gens[name](args.repos), args.out / f"{name}.pt")
        print(f"wrote {args.out / (name + '.pt')}")


if __name__ == "__main__":
    main()
