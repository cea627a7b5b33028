import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def load_script(script: str) -> ModuleType:
    """A script of the checkout (`01_train_folds.py`, `scripts/ablate.py`) loaded as a module, so a test can call its main():
    stage names start with a digit and scripts/ is no package, so `import` cannot reach them."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
