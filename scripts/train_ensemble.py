"""`make ensemble CONFIG=...`: train every member experiment an ensemble config blends, then the ensemble's own stages.

    python scripts/train_ensemble.py --config configs/demo_ensemble.yaml [--dry-run] [key=value ...]

The config's `ensemble.recipes` lists the member experiments' config files. Each recipe runs only
the stages its members need (`<exp>/phase1`: 00 and 01; phase2 or round<r>: 00 to 03), then the
ensemble config runs 00, the phases of its own that it names, and 04. Every stage decides for
itself, so a second run retrains nothing that is current. Overrides (key=value, such as output_root=
or data.root= on Kaggle) apply to every config, the members' and the ensemble's, except `exp`, which
names each experiment; `--dry-run` is passed to every stage (a stage whose upstream would run says so).
"""
from __future__ import annotations

import argparse
import subprocess  # runs this project's own stage scripts
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.config import Config, ConfigError, load_config  # noqa: E402
from lib.modelref import ModelRef  # noqa: E402

TRAIN = ["00_prepare_data.py", "01_train_folds.py"]
SELF_TRAIN = ["02_pseudo_label.py", "03_retrain.py"]


def needed(refs: list[ModelRef]) -> list[str]:
    """The stage scripts that make these models of one experiment: 00 and 01, and 02 and 03 for phase2 or round<r>."""
    if not refs:
        return []
    return TRAIN + (SELF_TRAIN if any(r.phase != "phase1" for r in refs) else [])


def plan(cfg: Config, overrides: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(config file, stage scripts) per recipe in `ensemble.recipes`, in order; the ensemble's own run is not included.
    Each recipe is read with `overrides` (they must leave it valid)."""
    refs = [ModelRef.parse(m) for m in [*cfg.submit.models, *cfg.pseudo.members]]
    out: list[tuple[str, list[str]]] = []
    named = {r.exp for r in refs if r.exp}
    seen = set()
    for recipe in cfg.ensemble.recipes:
        exp = load_config(recipe, overrides or []).exp
        if exp not in named:
            raise ConfigError(f"ensemble.recipes lists {recipe} (experiment '{exp}'), which no model of submit.models or "
                              f"pseudo.members names; name one of its models (e.g. {exp}/phase1) or drop the recipe.")
        seen.add(exp)
        out.append((recipe, needed([r for r in refs if r.exp == exp])))
    missing = sorted(named - seen)
    if missing:
        print(f"note: no recipe for experiment(s) {', '.join(missing)}: their stages must already be current", file=sys.stderr)
    return out


def own_stages(cfg: Config) -> list[str]:
    """The ensemble experiment's stages: 00, the phases of its own it names (with 02 and 03 for phase 2), 04."""
    mine = [r for r in map(ModelRef.parse, [*cfg.submit.models, *cfg.pseudo.members]) if r.exp is None]
    phases = needed([r for r in mine if r.name in cfg.submit.models])
    return (phases or ["00_prepare_data.py"]) + ["04_infer_submit.py"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        if any(o.split("=", 1)[0].strip() == "exp" for o in args.overrides):
            raise ConfigError("make ensemble takes no exp= override: each recipe names its experiment; set exp in the ensemble "
                              "config or drop the override.")
        cfg = load_config(args.config, args.overrides)
        runs = [(r, stages, list(args.overrides)) for r, stages in plan(cfg, args.overrides)]
        runs.append((args.config, own_stages(cfg), list(args.overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = ["--dry-run"] if args.dry_run else []
    for recipe, stages, overrides in runs:
        for script in stages:
            cmd = [sys.executable, str(ROOT / script), "--config", recipe, *overrides, *flags]
            print("+ " + " ".join(cmd[1:]), flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)  # our own scripts, arguments from the command line
            if rc != 0:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
