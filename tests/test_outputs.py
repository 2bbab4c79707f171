"""One overwrite policy and atomic writes (issue 9, items 3 and 4), at the library level."""

import os

import pytest

from ccnn_convert.errors import CCNNError, ParameterError
from ccnn_convert.outputs import atomic_path, check_output, check_output_dir, staged_directory


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_existing_file_needs_force(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(ParameterError) as info:
        check_output(target)
    assert info.value.parameter == "force"
    assert info.value.render("--force").endswith("(set --force to overwrite it)")
    with atomic_path(target, force=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["out.json"]


def test_a_directory_is_named_as_such_even_with_force(tmp_path):
    for force in (False, True):
        with pytest.raises(CCNNError, match="it is a directory") as info:
            check_output(tmp_path, force=force)
        assert not isinstance(info.value, ParameterError)  # no "use --force" advice


def test_missing_parent_is_one_line(tmp_path):
    with pytest.raises(CCNNError, match="does not exist"):
        check_output(tmp_path / "no" / "file.pt")


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, exception):
    with pytest.raises(exception):
        with atomic_path(tmp_path / "a.pt") as tmp:
            tmp.write_text("half")
            raise exception()
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_failed_staging_leaves_nothing(tmp_path, exception):
    with pytest.raises(exception):
        with staged_directory(tmp_path / "m.onnx") as staged:
            staged.write_text("complete model")
            (staged.parent / "m.onnx.data").write_text("weights")
            raise exception()
    assert _listing(tmp_path) == []


def test_staging_moves_companions_and_respects_the_policy_for_them(tmp_path):
    with staged_directory(tmp_path / "m.onnx") as staged:
        staged.write_text("model")
        (staged.parent / "m.onnx.data").write_text("weights")
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(ParameterError):  # the companion exists: refused, and nothing is moved
        with staged_directory(tmp_path / "m.onnx") as staged:
            staged.write_text("model 2")
            (staged.parent / "m.onnx.data").write_text("weights 2")
    assert _listing(tmp_path) == ["m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "weights"


def test_output_dir_checks_each_file_it_will_write(tmp_path):
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(ParameterError):
        check_output_dir(tmp_path, ["bench.md", "bench.json"])
    assert check_output_dir(tmp_path, ["bench.json"], force=True) == tmp_path
    assert check_output_dir(tmp_path / "new", ["bench.json"]) == tmp_path / "new"
    with pytest.raises(CCNNError, match="is a file"):
        check_output_dir(tmp_path / "bench.json")


def test_written_file_has_normal_permissions(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
