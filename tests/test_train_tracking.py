"""wandb mode choice before init (auto never tries the network without a key), the persisted run id, and
secrets kept out of the logged config. The real offline run folder is covered by test_train_stage.py."""

from __future__ import annotations

import pytest

from pipeline.config import WandbConfig
from pipeline.errors import UserError
from pipeline.tracking import choose_mode, persistent_run_id, redact_secrets, start_run


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    empty_netrc = tmp_path / "netrc"
    empty_netrc.write_text("")
    monkeypatch.setenv("NETRC", str(empty_netrc))


def test_auto_goes_offline_without_a_key_and_says_how_to_go_online(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # never contacted: no key means offline
    mode, reason = choose_mode(WandbConfig(mode="auto"))
    assert mode == "offline" and "WANDB_API_KEY" in reason


def test_auto_with_a_key_but_no_server_goes_offline(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert choose_mode(WandbConfig(mode="auto")) == ("offline", "http://127.0.0.1:9 is not reachable")


def test_key_in_netrc_counts_as_logged_in(no_wandb_key, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert choose_mode(WandbConfig(mode="online"))[0] == "online"


def test_online_without_a_key_fails_with_the_fix(no_wandb_key):
    with pytest.raises(UserError, match="WANDB_API_KEY or run `wandb login`"):
        choose_mode(WandbConfig(mode="online"))


def test_environment_mode_is_respected_by_auto(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_mode(WandbConfig(mode="auto"))[0] == "disabled"


def test_disabled_starts_nothing(tmp_path):
    assert start_run(WandbConfig(mode="disabled"), tmp_path, tmp_path / "train", "train", {}) is None
    assert not (tmp_path / "train").exists()


def test_run_id_is_created_once_and_reused(tmp_path):
    first = persistent_run_id(tmp_path / "train")
    assert first == persistent_run_id(tmp_path / "train") == (tmp_path / "train" / "wandb_run_id").read_text().strip()
    assert first != persistent_run_id(tmp_path / "other")


def test_secrets_never_reach_the_logged_config():
    config = {"train": {"lr": 1e-4, "hf_token": "hf_abc", "wandb": {"api_key": "k", "project": "p"}},
              "list": [{"password": "x", "keep": 1}]}
    assert redact_secrets(config) == {
        "train": {"lr": 1e-4, "hf_token": "<redacted>", "wandb": {"api_key": "<redacted>", "project": "p"}},
        "list": [{"password": "<redacted>", "keep": 1}],
    }
