"""Agent bootstrap: build the agent zipapp and start it on the far side of a channel.

The zipapp holds the agent's modules plus msgpack's pure-Python fallback. It is uploaded
once per content hash into a cache directory outside the workspace, verified by SHA-256
on every start, and run with the remote's ``python3`` (3.8 or newer).
"""

from __future__ import annotations

import hashlib
import io
import shlex
import zipfile
from functools import lru_cache
from pathlib import Path

import msgpack

import syncd
from syncd.transport.options import DEFAULT_CACHE_DIR

# Modules the agent needs; all must stay Python 3.8 compatible (checked by vermin in CI).
AGENT_MODULES = (
    "__init__.py",
    "protocol/__init__.py",
    "protocol/messages.py",
    "protocol/codec.py",
    "protocol/entryblock.py",
    "scan.py",
    "fsops.py",
    "rules.py",
    "agent/__init__.py",
    "agent/main.py",
    "agent/watch.py",
    "agent/tar_jobs.py",
    "agent/gnu_tar.py",
    "tarstream.py",
    "tarformat.py",
)
MSGPACK_MODULES = ("__init__.py", "exceptions.py", "ext.py", "fallback.py")
NEED = b"SYNCD-NEED\n"
READY = b"SYNCD-READY\n"
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)

_MAIN = b"import sys\nfrom syncd.agent.main import main\nsys.exit(main())\n"

# Runs on the remote as `python3 -S -c LOADER HASH SIZE CACHE_DIR`. Reads stdin with os.read
# so that no byte meant for the agent is swallowed by a buffer. Started without `site`: the
# agent needs only the standard library and, if installed, msgpack, and .pth files and
# site hooks can cost more than the rest of the start.
LOADER = r"""
import hashlib, os, sys
h, n, d = sys.argv[1], int(sys.argv[2]), os.path.expanduser(sys.argv[3])
if sys.version_info < (3, 8):
    sys.stderr.write("syncd: remote python3 is %s, 3.8 or newer is needed\n" % sys.version.split()[0])
    sys.exit(64)
p = os.path.join(d, "agent-%s.pyz" % h[:24])
def ok():
    try:
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == h
    except OSError:
        return False
def say(b):
    os.write(1, b)
if not ok():
    say(b"SYNCD-NEED\n")
    parts, got = [], 0
    while got < n:
        c = os.read(0, min(1 << 20, n - got))
        if not c:
            sys.exit(65)
        parts.append(c)
        got += len(c)
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != h:
        sys.stderr.write("syncd: agent upload corrupted in transit\n")
        sys.exit(65)
    os.makedirs(d, mode=0o700, exist_ok=True)
    t = "%s.%d.tmp" % (p, os.getpid())
    with open(t, "wb") as f:
        f.write(data)
    os.replace(t, p)
say(b"SYNCD-READY\n")
try:  # an installed msgpack >= 1.0 has the C extension: faster than the bundled fallback
    import site
    for s in site.getsitepackages() + [site.getusersitepackages()]:
        if s not in sys.path and os.path.isdir(s):
            sys.path.append(s)
    import msgpack
    if msgpack.version < (1, 0):
        del sys.modules["msgpack"]
except ImportError:
    pass
# Run from an unpacked copy of the checked archive: unlike a zip, a directory lets Python
# keep the compiled modules, so later starts do not compile them again. It is unpacked
# under a temporary name and renamed, so a copy is whole or absent.
x = p[:-4]
if not os.path.isdir(x):
    t = "%s.%d.tmp" % (x, os.getpid())
    try:
        import zipfile
        with zipfile.ZipFile(p) as z:
            z.extractall(t)
        os.rename(t, x)
    except Exception:
        import shutil
        shutil.rmtree(t, ignore_errors=True)
sys.path.insert(0, x if os.path.isdir(x) else p)
from syncd.agent.main import main
sys.exit(main())
"""


@lru_cache(maxsize=1)
def agent_zipapp() -> bytes:
    """The agent zipapp, byte-for-byte reproducible for a given installed version."""
    buf = io.BytesIO()
    pkg = Path(syncd.__file__).parent
    msgpack_dir = Path(msgpack.__file__).parent
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)

        add("__main__.py", _MAIN)
        for rel in AGENT_MODULES:
            add("syncd/" + rel, (pkg / rel).read_bytes())
        for rel in MSGPACK_MODULES:
            add("msgpack/" + rel, (msgpack_dir / rel).read_bytes())
    return buf.getvalue()


def agent_digest() -> str:
    return hashlib.sha256(agent_zipapp()).hexdigest()


def loader_command(python: str = "python3", cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """The shell command that starts the agent through the loader."""
    blob = agent_zipapp()
    return " ".join(
        [
            shlex.quote(python) if python == "python3" or "/" in python else python,
            "-S",
            "-c",
            shlex.quote(LOADER),
            agent_digest(),
            str(len(blob)),
            shlex.quote(cache_dir),
        ]
    )


