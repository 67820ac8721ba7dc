"""Pushing to the Hub, against the fake Hub of ``tests/hub_server.py`` (it tests the protocol, not the Hub).

The test session runs with ``HF_HUB_OFFLINE=1`` (conftest), which makes huggingface_hub refuse every request;
the ``online`` fixture lifts that for one test by patching ``huggingface_hub.constants.HF_HUB_OFFLINE``, which
huggingface_hub reads at request time. The fake Hub's URL reaches ``HfApi`` through ``push_folder(endpoint=...)``
or, for the command line, by patching ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT`` is only read at
import).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest

from fishmerge.cards import render_merge_card
from fishmerge.cli import push as push_cli
from fishmerge.errors import ConfigError, HubError
from fishmerge.hub import push_folder
from hub_server import FakeHub
from test_cards import merge_info

TOKEN = "hf_TESTtokenNEVERshown0123456789"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small result folder: card, weights, config and a nested file."""
    out = tmp_path / "merged"
    out.mkdir()
    render_merge_card(merge_info()).save(out / "README.md")
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (out / "config.json").write_text('{"model_type": "llama"}\n')
    (out / "fisher").mkdir()
    (out / "fisher" / "notes.txt").write_text("per-input Fisher summaries\n")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # never uploaded
    return out


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def expected_files(folder: Path) -> dict[str, bytes]:
    return {path: data for path, (data, _) in snapshot(folder).items() if not path.startswith(".git")}


def test_push_sends_one_commit_with_every_file(folder, online, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with FakeHub() as hub:
        result = push_folder(
            folder,
            "someone/llama-tiny-merged",
            private=True,
            revision="exp-1",
            commit_message="First merge",
            token=TOKEN,
            endpoint=hub.url,
        )
    assert hub.endpoints() == ["create_repo", "create_branch", "validate_yaml", "preupload", "commit"]
    created = {"name": "llama-tiny-merged", "organization": "someone", "visibility": "private"}
    assert hub.repos == {"someone/llama-tiny-merged": created}
    assert hub.branches == {("someone/llama-tiny-merged", "exp-1")}
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == ("someone/llama-tiny-merged", "exp-1", "First merge")
    assert commit.files == expected_files(folder)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert [f.path for f in result.files] == sorted(commit.files)
    assert result.commit_url and not result.dry_run
    shown = [result.summary(), capsys.readouterr().out, caplog.text, result.card_text, (folder / "README.md").read_text()]
    assert not any(TOKEN in text for text in shown)


def test_pushing_twice_is_safe(folder, online):
    with FakeHub() as hub:
        push_folder(folder, "someone/m", token=TOKEN, endpoint=hub.url)
        push_folder(folder, "someone/m", token=TOKEN, endpoint=hub.url)
    assert [c.files for c in hub.commits] == [expected_files(folder)] * 2
    assert "visibility" not in hub.repos["someone/m"]  # no --private: the namespace default applies


def test_server_error_leaves_folder_untouched_and_a_retry_succeeds(folder, online):
    before = snapshot(folder)
    with FakeHub(fail_with=500) as broken:
        with pytest.raises(HubError, match="answered 500") as excinfo:
            push_folder(folder, "someone/m", token=TOKEN, endpoint=broken.url)
    message = str(excinfo.value)
    assert "\n" not in message and "push again" in message and TOKEN not in message
    assert snapshot(folder) == before
    with FakeHub() as healthy:
        push_folder(folder, "someone/m", token=TOKEN, endpoint=healthy.url)
    assert healthy.commits[0].files == expected_files(folder)


def test_unreachable_hub_is_a_hub_error(folder, online):
    with FakeHub() as hub:
        url = hub.url
    with pytest.raises(HubError, match="could not reach"):
        push_folder(folder, "someone/m", token=TOKEN, endpoint=url)


def test_refused_token_says_so(folder, online):
    with FakeHub(fail_with=403) as hub, pytest.raises(HubError, match="write access"):
        push_folder(folder, "someone/m", token=TOKEN, endpoint=hub.url)


def test_no_token_is_a_hub_error_before_any_request(folder, online, no_token):
    with FakeHub() as hub, pytest.raises(HubError, match="hf auth login"):
        push_folder(folder, "someone/m", endpoint=hub.url)
    assert hub.requests == []


def test_token_from_environment(folder, online, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as hub:
        push_folder(folder, "someone/m", endpoint=hub.url)
    assert hub.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_offline_mode_is_refused_with_the_fix(folder):
    with FakeHub() as hub, pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "someone/m", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "some one/m", "org--x/m", "", "/abs/path"])
def test_invalid_repo_id(folder, online, repo_id):
    with FakeHub() as hub, pytest.raises(ConfigError, match="repo id"):
        push_folder(folder, repo_id, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_folder_without_card_or_with_bad_metadata(folder, online, tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        push_folder(tmp_path / "missing", "someone/m", dry_run=True)
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# M\n")
    with pytest.raises(ConfigError, match="YAML metadata block"):
        push_folder(folder, "someone/m", dry_run=True)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\nbase_model: /home/me/ckpt\n---\n# M\n")
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        push_folder(folder, "someone/m", dry_run=True)
    (folder / "README.md").unlink()
    with pytest.raises(ConfigError, match="no README.md"):
        push_folder(folder, "someone/m", dry_run=True)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fishmerge")
    push_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_dry_run_lists_files_and_card_and_sends_nothing(folder, online, no_token, monkeypatch, capsys):
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert cli(["push", str(folder), "someone/m", "--private", "--dry-run"]) == 0
    assert hub.requests == []
    out = capsys.readouterr().out
    assert "Dry run, nothing was sent" in out and "someone/m" in out
    for path, data in expected_files(folder).items():
        assert any(line.split()[:2] == [path, f"{len(data):,}"] for line in out.splitlines()), path
    assert ".git/HEAD" not in out
    assert (folder / "README.md").read_text().strip() in out


def test_cli_push(folder, online, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert cli(["push", str(folder), "someone/m", "--revision", "v2", "--commit-message", "Release"]) == 0
    assert hub.commits[0].summary == "Release" and hub.commits[0].revision == "v2"
    assert TOKEN not in capsys.readouterr().out


def test_push_to_hub_flag_for_other_commands(folder, online, monkeypatch):
    parser = argparse.ArgumentParser()
    push_cli.add_push_arguments(parser)
    assert push_cli.push_from_args(folder, parser.parse_args([])) is None
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = parser.parse_args(["--push-to-hub", "someone/m", "--private", "--hub-revision", "exp"])
    push_cli.check_push_args(args)
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        result = push_cli.push_from_args(folder, args)
    assert result is not None and result.private and hub.commits[0].revision == "exp"
    with pytest.raises(ConfigError, match="repo id"):
        push_cli.check_push_args(parser.parse_args(["--push-to-hub", "a/b/c"]))


def test_check_push_args_needs_a_token(no_token):
    parser = argparse.ArgumentParser()
    push_cli.add_push_arguments(parser)
    with pytest.raises(HubError, match="hf auth login"):
        push_cli.check_push_args(parser.parse_args(["--push-to-hub", "someone/m"]))


def test_merge_push_to_hub_end_to_end(tmp_path, online, monkeypatch):
    from builders import save_model, save_random_fisher
    from fishmerge.cli.main import main

    a, b = save_model(tmp_path / "a", seed=1), save_model(tmp_path / "b", seed=2)
    fa, fb = save_random_fisher(tmp_path / "fa", a, seed=3), save_random_fisher(tmp_path / "fb", a, seed=4)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "merged"
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert main(["merge", "--out", str(out), "--model", str(a), "--fisher", str(fa), "--model", str(b),
                    "--fisher", str(fb), "--push-to-hub", "someone/merged"]) == 0
    assert len(hub.commits) == 1
    sent = hub.commits[0].files
    assert sent == expected_files(out)
    assert 'from_pretrained("someone/merged")' in sent["README.md"].decode()
