import os

from dng.io import write_atomic, write_json


def test_atomic_write_leaves_no_temporary_and_gets_open_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "r.json", {"a": 1})
        write_atomic(tmp_path / "sub" / "r.json", "replaced\n")
    finally:
        os.umask(old)
    assert path.read_text() == "replaced\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
