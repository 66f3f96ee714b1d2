"""A past revision of the package, built from git, to compare the current code against
(`bench_lookup.py --base`, `sass.py --compare`), as flash-linear-attention's benchmarks compare with a base
commit.

`materialise(rev, dest)` writes the revision's packages in their installed layout (`LAYOUT`, pyproject's
package-dir); `python(rev, code)` runs Python code in a
subprocess whose `nf4` is that revision. The two versions never share a process: they have the same
module names and register the same custom ops. A shallow clone lacks old revisions (`available`); where
there is no git history at all, write the tree elsewhere and pass its folder instead of the revision:

    python benchmarks/static/revision.py REV DIR
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

BASE = "2d550bfb5869"
"""The decode kernel before issue 17: its pair table in global memory, read through L1."""

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = {"nf4/": "nf4/", "kernels/": "nf4/kernels/", "lora/": "nf4/lora/"}
"""Source folder -> its place in the installed package, the same in every revision so far."""


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout


def commit(rev: str) -> str | None:
    """The full hash of `rev` in this repository; None where it is not there (a shallow clone, no git)."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def available(rev: str = BASE) -> bool:
    """Whether `rev` is a materialised tree (a folder) or a commit of this repository."""
    return Path(rev).is_dir() or commit(rev) is not None


def materialise(rev: str, dest: Path) -> Path:
    """Write the packages of revision `rev` under `dest` in their installed layout, and `rev` in
    dest/REVISION; returns `dest` (the folder to put on PYTHONPATH)."""
    sha = commit(rev)
    if sha is None:
        raise ValueError(
            f"revision {rev!r} is not in the repository at {ROOT} (a shallow clone?): "
            "fetch the history (`git fetch --unshallow`) or pass a folder written by `revision.py REV DIR`"
        )
    dest = Path(dest)
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", sha, "--", *LAYOUT))) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            for src, installed in LAYOUT.items():
                if member.name.startswith(src):
                    target = dest / (installed + member.name[len(src) :])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
    (dest / "REVISION").write_text(f"{rev} {sha}\n")
    return dest


def label(rev: str) -> str:
    """`rev`, or for a folder the revision it was written from."""
    if Path(rev).is_dir():
        stamp = Path(rev) / "REVISION"
        return stamp.read_text().split()[0] if stamp.is_file() else Path(rev).resolve().name
    return rev


@contextmanager
def tree(rev: str):
    """The folder of `rev`'s packages: `rev` itself where it is a folder, else a temporary one built from git."""
    if Path(rev).is_dir():
        yield Path(rev).resolve()
        return
    with tempfile.TemporaryDirectory(prefix=f"nf4-{rev[:12]}-") as tmp:
        yield materialise(rev, Path(tmp))


def python(rev: str, code: str, *args: str, path: tuple[str, ...] = (), interpret: bool | None = None,
           timeout: float | None = None) -> str:  # fmt: skip
    """Run `python -c code *args` with `nf4` imported from revision `rev` (then the folders of `path`, then
    this process's PYTHONPATH); its stdout. `interpret`: set (True) or unset (False) TRITON_INTERPRET,
    None keeps this process's. Raises RuntimeError with the subprocess's stderr if it fails."""
    env = dict(os.environ)
    if interpret is not None:
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
    with tree(rev) as folder:
        env["PYTHONPATH"] = os.pathsep.join([str(folder), *map(str, path), *filter(None, [env.get("PYTHONPATH")])])
        # run from the tree: in a checkout's root, `kernels/` would shadow Hugging Face's package of that name
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"python under revision {rev} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/static/revision.py REV DIR")
    print(materialise(sys.argv[1], Path(sys.argv[2])))
