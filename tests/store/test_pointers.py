"""A `latest` pointer that names no usable checkpoint (outside the run, missing, half
written) is named in a note and the newest complete checkpoint is used, by every reader
of the pointer: resume, sample/eval's checkpoint resolution, info (issue 26, item 19)."""

import shutil

import pytest
from conftest import own_cache, tiny_config, write_corpus

from gptcli.config import config_from_dict
from gptcli.events import Notice
from gptcli.store.info import checkpoint_info
from gptcli.store.rundir import PointerWarning, read_pointer, resolve_checkpoint
from gptcli.store.runlog import read_run_file
from gptcli.tasks.pretrain import pretrain

BAD_POINTERS = {
    "outside": "../../elsewhere/checkpoints/step-000004",  # another run's checkpoint
    "absolute": "/tmp/step-000004",
    "missing": "step-000099",
    "dotdot": "..",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run saved at steps 2 and 4, trained once for this module, and its config."""
    root = tmp_path_factory.mktemp("pointers")
    with own_cache(root):
        cfg = tiny_config([str(write_corpus(root / "corpus"))], root / "run", max_steps=4, save_every=2,
                          eval_every=2, log_every=2)
        pretrain(config_from_dict(cfg))
    return root / "run", cfg


@pytest.fixture
def run(tmp_path, trained):
    """This test's copy of the trained run."""
    return shutil.copytree(trained[0], tmp_path / "run")


def point(run, text, name="latest"):
    (run / "checkpoints" / name).write_text(text + "\n")


@pytest.mark.parametrize("bad", BAD_POINTERS)
def test_resume_falls_back_to_the_newest_checkpoint_with_a_note(tmp_path, trained, run, bad):
    point(run, BAD_POINTERS[bad])
    notes = []
    cfg = config_from_dict({**trained[1], "out_dir": str(run), "train": {**trained[1]["train"], "max_steps": 6}})
    pretrain(cfg, resume=True, on_event=lambda e: isinstance(e, Notice) and notes.append(e.message))
    pointer_notes = [n for n in notes if "checkpoints/latest" in n]
    assert pointer_notes and "step-000004" in pointer_notes[0], notes
    assert BAD_POINTERS[bad].strip("/").split("/")[-1] in pointer_notes[0] or bad == "dotdot"
    assert read_pointer(run, "latest").name == "step-000006"  # it went on from step 4
    assert read_run_file(run)["status"] == "finished"


@pytest.mark.parametrize("bad", BAD_POINTERS)
def test_resolving_a_run_warns_and_uses_the_newest_checkpoint(run, bad):
    (run / "checkpoints" / "best").unlink()  # as before a run's first evaluation: latest is used
    point(run, BAD_POINTERS[bad])
    with pytest.warns(PointerWarning, match="checkpoints/latest") as caught:
        found = resolve_checkpoint(run)  # what sample and eval do with a run directory
    assert found == run / "checkpoints" / "step-000004"
    assert "using the newest complete checkpoint, step-000004" in str(caught[0].message)


def test_resolving_reports_to_on_event_when_given(run):
    point(run, "step-000099")
    point(run, "step-000099", name="best")
    notes = []
    assert resolve_checkpoint(run, on_event=notes.append).name == "step-000004"
    assert [n.message.split(" names ")[0].rsplit("/", 1)[-1] for n in notes] == ["best", "latest"]
    assert all("step-000099, which does not exist" in n.message for n in notes)


def test_info_names_the_bad_pointer(run):
    point(run, "../../elsewhere")
    info = checkpoint_info(run)
    assert info["checkpoint"].endswith("step-000004") and info["step"] == 4
    assert any("checkpoints/latest" in p and "elsewhere" in p for p in info["problems"]), info


def test_incomplete_and_merged_folders_are_not_fallbacks(run):
    folder = run / "checkpoints"
    (folder / "step-000009").mkdir()  # no weights, no manifest: not a finished save
    shutil.copytree(folder / "step-000002", folder / "step-000008-merged")
    half = shutil.copytree(folder / "step-000004", folder / "step-000007")
    (half / "manifest.json").unlink()
    point(run, "step-000007")
    with pytest.warns(PointerWarning, match="step-000007, which is not a complete checkpoint"):
        assert read_pointer(run, "latest") == folder / "step-000004"


def test_missing_latest_beside_checkpoints_falls_back(run):
    (run / "checkpoints" / "latest").unlink()
    with pytest.warns(PointerWarning, match="latest is missing"):
        assert read_pointer(run, "latest").name == "step-000004"


def test_bad_best_pointer_is_named_and_latest_used(run):
    point(run, "../../nowhere", name="best")
    with pytest.warns(PointerWarning, match="checkpoints/best names '../../nowhere'.*ignoring it"):
        assert resolve_checkpoint(run).name == "step-000004"


def test_good_pointers_and_no_pointers_are_quiet(run, tmp_path, recwarn):
    assert read_pointer(run, "latest").name == "step-000004"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert read_pointer(tmp_path / "empty", "latest") is None
    assert read_pointer(tmp_path / "empty", "best") is None
    assert not [w for w in recwarn if issubclass(w.category, PointerWarning)]
