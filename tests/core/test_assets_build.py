"""The first build of builtin:smollm2-135m-instruct may run on several ranks at once: the first finished build
wins, later ones are discarded, and nothing deletes the published folder."""

from visiontune.core.assets import _publish_build


def _build(folder, text):
    folder.mkdir()
    (folder / "config.json").write_text(text)
    return folder


def test_second_build_is_discarded_and_the_first_kept(tmp_path):
    target = tmp_path / "model"
    first = _publish_build(_build(tmp_path / ".model.1", "first"), target)
    second = _publish_build(_build(tmp_path / ".model.2", "second"), target)
    assert first == second == target and (target / "config.json").read_text() == "first"
    assert not (tmp_path / ".model.2").exists()


def test_an_incomplete_older_folder_is_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "half.bin").write_text("x")
    _publish_build(_build(tmp_path / ".model.1", "new"), target)
    assert (target / "config.json").read_text() == "new" and not (target / "half.bin").exists()
