"""runtime: errors about the device name the setting they came from."""

import pytest
import torch
from conftest import run_cli, tiny_config

from gptcli.errors import GptcliError
from gptcli.runtime import resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@no_gpu
def test_a_missing_gpu_is_named_by_the_option_that_asked_for_it():
    with pytest.raises(GptcliError, match=r"^--device: 'cuda' asked for, but no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(GptcliError, match=r"^train.device: 'cuda:1' asked for"):
        resolve_device("cuda:1", option="train.device")
    with pytest.raises(GptcliError, match=r"^--device: unknown device 'gpu'"):
        resolve_device("gpu")


@no_gpu
@pytest.mark.parametrize("command", [["sample", "-p", "x"], ["eval"], ["serve", "--port", "0"]])
def test_commands_name_their_own_device_option(command, tmp_path, corpus_dir, capsys):
    import yaml

    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["pretrain", str(tmp_path / "tiny.yaml")], capsys)[0] == 0
    code, _out, err = run_cli([*command, "-c", str(tmp_path / "run"), "--device", "cuda"], capsys)
    assert code == 2 and "error: --device: 'cuda' asked for, but no CUDA GPU is available" in err


@no_gpu
def test_a_config_names_train_device(tmp_path, corpus_dir, capsys):
    import yaml

    cfg = tiny_config([str(corpus_dir)], tmp_path / "run", max_steps=1)
    cfg["train"]["device"] = "cuda"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    code, _out, err = run_cli(["pretrain", str(tmp_path / "tiny.yaml")], capsys)
    assert code == 2 and "error: train.device: 'cuda' asked for" in err


def test_processes_that_cannot_connect_get_one_line_naming_the_fix(monkeypatch):
    """A restarted torchrun group sharing the rendezvous store (pytorch/pytorch#135712), and
    any other failure to connect: a GptcliError saying what to check, not a gloo trace."""
    import torch.distributed

    from gptcli.errors import GptcliError
    from gptcli.runtime import init_distributed

    def refuse(**kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting\nmore")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    with pytest.raises(GptcliError, match=r"^the processes could not connect \(Gloo connectFullMesh failed .*\); "
                                          r"check that every node runs the same torchrun command"):
        init_distributed(torch.device("cpu"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(GptcliError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed(torch.device("cpu"))
