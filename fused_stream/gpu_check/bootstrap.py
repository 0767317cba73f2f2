"""What `python -m fused_stream.gpu_check` checks before it imports torch or moshi: standard library only.

A GPU machine lent for a few minutes has torch and Triton in its image but maybe not moshi (it pins an older torch)
nor a C compiler (Triton builds a small launcher module with one, against the Python headers, the first time a
kernel runs). Each missing piece is one line and exit status 2 here, before minutes are spent, instead of a
traceback in the middle of a check:

- the C compiler (`$CC`, or `cc`, `gcc`, `clang` on PATH) and `Python.h`: needed on CUDA only (the dry run's loss
  kernel is the torch twin);
- `import moshi.models`: when it fails, the wheels in `--wheels DIR` (default `.whl/` at the repository root,
  where `pip download --no-deps -d .whl moshi==0.2.13 'sphn>=0.2,<0.3'` puts them) are installed with
  `pip install --no-index --no-deps --target DIR/.site` (no network) and that folder goes first on `sys.path` and
  on the subprocesses' PYTHONPATH. `moshi.models` needs nothing beyond the image but moshi itself (torch, numpy,
  safetensors, einops, sentencepiece, huggingface_hub and what it brings: tqdm, pyyaml); moshi's other
  requirements (aiohttp, sounddevice, bitsandbytes; sphn for audio files) are not imported by anything gpu_check
  runs. A module still missing after the install is named, with the fix.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WHEELS = REPO / ".whl"
SITE = ".site"  # inside the wheels folder: what the install adds to sys.path


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (argparse has not run yet)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def missing_toolchain() -> str | None:
    """Why Triton could not build its launcher here (no C compiler, no Python.h), or None."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    missing = []
    if not any(shutil.which(name) for name in names):
        missing.append(f"a C compiler ({' / '.join(names)} on PATH)")
    include = sysconfig.get_paths().get("include") or ""
    if not Path(include, "Python.h").is_file():
        missing.append(f"the Python headers ({include or 'no include dir'}/Python.h)")
    if not missing:
        return None
    return (f"Triton builds its kernel launcher with a C compiler against the Python headers, and this machine lacks "
            f"{' and '.join(missing)}: install them (e.g. apt-get install gcc python3-dev) or set CC")


def ensure_moshi(wheels: Path) -> str | None:
    """Make `import moshi.models` work, from the wheels in `wheels` if needed; the one-line reason when it cannot."""
    try:
        importlib.import_module("moshi.models")
        return None
    except ImportError as error:
        first = error
    except Exception as error:  # noqa: BLE001 - moshi is there but does not import (another torch): say so
        return f"import moshi.models fails: {type(error).__name__}: {error}"
    # An earlier run's install, or the `--target .site` of a hand-made install at the repository root.
    site = next((d for d in (wheels / SITE, REPO / SITE) if (d / "moshi").is_dir()), wheels / SITE)
    if not (site / "moshi").is_dir():
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if not any(p.name.startswith("moshi-") for p in found):
            return (f"moshi is not importable ({first}) and {wheels} holds no moshi wheel: copy the wheels there "
                    f"first (pip download --no-deps -d {wheels} moshi==0.2.13 'sphn>=0.2,<0.3' on a machine with "
                    f"network), or pip install moshi==0.2.13")
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                   *map(str, found)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            return f"installing {wheels}/*.whl failed: {lines[-1] if lines else f'pip exit {proc.returncode}'}"
        print(f"gpu_check: installed {', '.join(p.name for p in found)} into {site}", flush=True)
    _forget("moshi")  # a failed import may have left parts behind
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    try:
        importlib.import_module("moshi.models")
    except ImportError as error:
        missing = getattr(error, "name", None) or str(error)
        return (f"import moshi.models still fails with the wheels of {wheels} installed ({error}): add a wheel of "
                f"{missing} to {wheels} (it is not in this machine's Python)")
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, for whoever runs this unattended
        return f"import moshi.models fails with the wheels of {wheels} installed: {type(error).__name__}: {error}"
    return None


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def prepare(argv: list[str]) -> None:
    """Exit 2 with one line on stderr when the command cannot run here; otherwise return with moshi importable."""
    wheels = Path(option(argv, "--wheels") or DEFAULT_WHEELS)
    problem = None
    if "--dry-run" not in argv and "-h" not in argv and "--help" not in argv:
        problem = missing_toolchain()
    problem = problem or ensure_moshi(wheels)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
