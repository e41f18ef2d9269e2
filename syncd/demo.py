"""``syncd demo``: two fresh directories, one session over a local agent, edits on both
sides, and what arrived where, printed as it happens."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable

import click

from syncd.endpoint import Endpoint
from syncd.session.config import SessionConfig
from syncd.session.session import Session


async def _until(check: Callable[[], bool], timeout: float = 10.0, task: asyncio.Task[None] | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if task is not None and task.done():
            task.result()
            raise RuntimeError("the session ended early")
        if check():
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise TimeoutError("change did not arrive in time")


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


async def run_demo(workdir: str) -> int:
    local = os.path.join(workdir, "local")
    remote = os.path.join(workdir, "remote")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.join(local, "src"))
    os.makedirs(remote)
    with open(os.path.join(local, "src", "main.py"), "w") as fh:
        fh.write("print('hello')\n")
    with open(os.path.join(local, ".gitignore"), "w") as fh:
        fh.write("build/\n")
    cfg = SessionConfig("demo", local, Endpoint("local", remote), state_dir=os.path.join(workdir, "state"))
    click.echo(f"syncd demo: {local}  <->  {remote} (agent as a local subprocess)\n")
    session = Session(cfg, lambda line: click.echo("    " + line))
    task = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.idle.is_set(), 30, task)
        click.echo(f"initial sync done: {sorted(os.listdir(remote))}\n")

        steps: list[tuple[str, Callable[[], object], Callable[[], bool]]] = [
            ("local edit  src/main.py", lambda: _write(local, "src/main.py", "print('edited locally')\n"),
             lambda: _read(os.path.join(remote, "src/main.py")) == "print('edited locally')\n"),
            ("remote new  notes.md", lambda: _write(remote, "notes.md", "# written by the agent\n"),
             lambda: _read(os.path.join(local, "notes.md")) == "# written by the agent\n"),
            ("local mkdir build/ (ignored: stays local)", lambda: _write(local, "build/out.o", "x"),
             lambda: True),
            ("remote rename notes.md -> NOTES.md",
             lambda: os.rename(os.path.join(remote, "notes.md"), os.path.join(remote, "NOTES.md")),
             lambda: os.path.exists(os.path.join(local, "NOTES.md"))
             and not os.path.exists(os.path.join(local, "notes.md"))),
            ("local delete src/main.py", lambda: os.unlink(os.path.join(local, "src/main.py")),
             lambda: not os.path.exists(os.path.join(remote, "src/main.py"))),
        ]
        for title, act, arrived in steps:
            click.echo(f"* {title}")
            act()
            took = await _until(arrived, 10, task)
            click.echo(f"  arrived in {took * 1000:.0f} ms")
        await asyncio.sleep(0.3)
        assert not os.path.exists(os.path.join(remote, "build")), "ignored path was sent"
        click.echo("\nboth sides agree; ignored build/ stayed local. demo done.")
        return 0
    finally:
        session.stop()
        await asyncio.gather(task, return_exceptions=True)


def _write(root: str, rel: str, text: str) -> None:  # noqa: D103
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
