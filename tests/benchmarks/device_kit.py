"""The GPU check on the lent machine as it is: the wheels its image lacks, installed and used.

The lent GPU machine reaches no package registry. Its image has Python 3.12 with torch,
transformers, onnxruntime, scikit-learn and the rest of this recipe's needs, but not the
packages in ``WHEELS``; those travel with the working tree as wheels (64 MiB in all, the
repository included) and are installed there into a folder of their own, reached through
``PYTHONPATH`` alone. This script does both ends, with the standard library only (it runs
before anything is installed):

    # here, with a registry: download, check the size, print the lent machine's command
    python tests/benchmarks/device_kit.py --download .whl

    # on the lent machine (the command --download prints; .whl travels as a carried path)
    python3 tests/benchmarks/device_kit.py --run core
    python3 tests/benchmarks/device_kit.py --run end_to_end

``--run CALL`` installs the wheels once (``--no-index --no-deps --target``), then runs
``gpu_smoke.py --call CALL`` with that folder on ``PYTHONPATH`` and its JSON written to ``$OUT``
(what comes back from the lent machine) or the current folder. docs/performance.md ("GPU
check") gives the steps and their time limits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

#: The repository.
ROOT = Path(__file__).resolve().parents[2]

#: What the lent image lacks (docs of the device, its package list), at versions that work with
#: its torch 2.11 and transformers 5.17 (the versions the recipe is tested with here).
WHEELS = {
    "speechbrain": "1.1.2",
    "hyperpyyaml": "1.2.3",
    "ruamel.yaml": "0.18.17",
    "ruamel.yaml.clib": "0.2.15",
    "soundfile": "0.14.0",
    "cffi": "2.0.0",
    "pycparser": "3.0",
    "espeakng-loader": "0.2.4",  # the synthetic corpus of the end-to-end section
}

#: The platforms pip may pick wheels for (the lent machine is x86-64 Linux, glibc 2.39).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

#: What travels to the lent machine, in all (the working tree and the carried wheels).
TRAVEL_LIMIT_BYTES = 64 * 2**20

#: Where the wheels are installed on the lent machine.
SITE = "/tmp/site"


def download(folder: Path, python_version: str) -> list[Path]:
    """Download ``WHEELS`` for ``python_version`` on Linux x86-64 into ``folder``; the wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):  # one version of each: two stop the whole install
        old.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", python_version, "--implementation", "cp", *platforms,
        "-d", str(folder), *(f"{name}=={version}" for name, version in WHEELS.items()),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != len(WHEELS):
        raise SystemExit(f"error: {len(wheels)} wheels in {folder}, expected {len(WHEELS)}")
    return wheels


def travelling_bytes() -> int:
    """Bytes of the working tree that travels: tracked files and untracked ones not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout  # fmt: skip
    files = (ROOT / name for name in listed.decode().split("\0") if name)
    return sum(path.stat().st_size for path in files if path.is_file())


def report_download(folder: Path, wheels: list[Path]) -> None:
    """Print the wheels with their sizes, the travel total against its limit, the command."""
    print("| wheel | MiB |\n|---|---:|")
    for wheel in wheels:
        print(f"| {wheel.name} | {wheel.stat().st_size / 2**20:.2f} |")
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    tree = travelling_bytes()
    total = wheel_bytes + tree
    print(
        f"\nwheels {wheel_bytes / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
        f"{total / 2**20:.1f} MiB of the {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB that travel"
    )
    if total > TRAVEL_LIMIT_BYTES:
        raise SystemExit("error: too much to travel: leave out a wheel or an untracked file")
    inside = folder.resolve().is_relative_to(ROOT)
    relative = folder.resolve().relative_to(ROOT) if inside else folder
    print(
        "\nOn the lent machine (carry: the folder above), one call per line:\n"
        f"  python3 tests/benchmarks/device_kit.py --wheels {relative} --run core\n"
        f"  python3 tests/benchmarks/device_kit.py --wheels {relative} --run end_to_end"
    )


def install(wheels: Path, site: Path) -> None:
    """Install the wheels of ``wheels`` into ``site`` once (its marker names what it holds)."""
    found = sorted(p.name for p in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"error: no wheels in {wheels}: --download them where pip has a registry")
    marker = site / ".device_kit"
    if marker.is_file() and marker.read_text().split() == found:
        return
    command = [
        sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
        "--no-cache-dir", "--upgrade", "--target", str(site), *(str(wheels / n) for n in found),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    marker.write_text("\n".join(found))


def run_call(call: str, site: Path, extra: list[str]) -> int:
    """``gpu_smoke.py --call CALL`` with ``site`` first on ``PYTHONPATH``; its exit status."""
    out = Path(os.environ.get("OUT", "."))
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    command = [sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu_smoke.py"), "--call",
               call, "--json", str(out / f"gpu_smoke_{call}.json"), *extra]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def main() -> int:
    """``--download`` here, or ``--run`` on the lent machine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--download", metavar="DIR", help="download the wheels into DIR")
    action.add_argument("--run", choices=["core", "end_to_end"], help="install, then run a call")
    parser.add_argument("--python-version", default="3.12", help="the lent image's Python")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="the wheels' folder")
    parser.add_argument("--site", default=SITE, help="where --run installs them")
    args, extra = parser.parse_known_args()  # the rest goes to gpu_smoke.py (e.g. --device)
    if args.download:
        folder = Path(args.download)
        report_download(folder, download(folder, args.python_version))
        return 0
    wheels = Path(args.wheels) if Path(args.wheels).is_absolute() else ROOT / args.wheels
    install(wheels, Path(args.site))
    return run_call(args.run, Path(args.site), extra)


if __name__ == "__main__":
    sys.exit(main())
