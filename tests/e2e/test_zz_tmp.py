import time
from pathlib import Path
from tests.e2e.helpers import start_session, wait_trees_equal, write_file, wait_until
def test_pull_new_dir(sshd, tmp_path: Path):
    local, remote = tmp_path/"l", tmp_path/"r"; local.mkdir(); remote.mkdir()
    write_file(local/"a", b"x")
    s = start_session(sshd, local, remote, tmp_path/"st")
    wait_trees_equal(local, remote, s, timeout=20)
    wait_until(lambda: "agent on python" in s.stderr())
    time.sleep(0.3)
    t=time.monotonic()
    write_file(remote/"newdir"/"sub"/"f.txt", b"y")
    write_file(remote/"newdir"/"g.txt", b"y")
    wait_trees_equal(local, remote, s, timeout=20)
    print("took", time.monotonic()-t)
    s.stop()
    print(s.stdout())
    assert not [l for l in s.stdout_lines() if l.startswith("!!")]
