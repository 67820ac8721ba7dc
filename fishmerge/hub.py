"""Publish a result folder (merged checkpoint, federated run output) to the Hugging Face Hub.

Everything that can be checked locally is checked before the first request: the folder, its README.md card
(loaded from disk and validated offline), the repo id and the token. The push itself is one
``create_repo(exist_ok=True)`` (plus ``create_branch(exist_ok=True)`` for a revision) and one
``upload_folder`` commit, so running it again after a failure is safe. The local folder is only ever read.

The token is handed to :class:`huggingface_hub.HfApi` and nowhere else: it is never printed, logged or
written, and error messages are built from status codes and server messages, which do not carry it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

try:  # huggingface_hub >= 2 speaks httpx2, 1.x speaks httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

from fishmerge import __version__
from fishmerge.cards import validate_card
from fishmerge.errors import ConfigError, HubError, one_line

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
_RETRY_HINT = "the local folder is untouched; fix the cause and push again (pushing twice is safe)"


@dataclass(frozen=True)
class PushedFile:
    """One file of the folder as it is (or would be) uploaded.

    Attributes:
        path: Path inside the repository, with forward slashes.
        size: Size in bytes.
    """

    path: str
    size: int


@dataclass(frozen=True)
class PushResult:
    """What a push sent, or would send on a dry run.

    Attributes:
        repo_id: The target repository.
        revision: The target branch; None means the default branch.
        private: Whether the repository was asked to be created private.
        files: Every file of the commit with its size, sorted by path.
        card_text: The README.md card as uploaded.
        dry_run: True when nothing was sent.
        commit_url: URL of the commit; None on a dry run.
    """

    repo_id: str
    revision: str | None
    private: bool
    files: tuple[PushedFile, ...]
    card_text: str
    dry_run: bool
    commit_url: str | None = None

    @property
    def total_size(self) -> int:
        """Bytes in all files together."""
        return sum(f.size for f in self.files)

    def summary(self) -> str:
        """A report for the terminal: target, files with sizes and, on a dry run, the card."""
        branch = self.revision or "the default branch"
        visibility = "private" if self.private else "default visibility"
        head = "Dry run, nothing was sent. Would push" if self.dry_run else "Pushed"
        target = f"{self.repo_id} ({branch}, {visibility})"
        lines = [f"{head} {len(self.files)} files ({self.total_size:,} bytes) to {target}"]
        width = max(len(f.path) for f in self.files)
        lines += [f"  {f.path:<{width}}  {f.size:>15,} bytes" for f in self.files]
        if self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        if self.dry_run:
            lines += [f"--- {CARD_NAME} ---", self.card_text.rstrip("\n"), f"--- end of {CARD_NAME} ---"]
        return "\n".join(lines)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a folder holding a model card to a Hub model repository in one commit.

    Args:
        folder: The folder to upload; it must hold a README.md card with valid metadata.
        repo_id: ``namespace/name`` (or ``name`` for the token's own namespace).
        private: Create the repository private. An existing repository keeps its visibility; without
            the flag a new repository gets the namespace's default visibility.
        revision: Branch to commit to, created from the default branch if missing.
        commit_message: Commit title; defaults to one naming fishmerge and the file count.
        dry_run: Check everything locally and report what would be sent, without network or token.
        token: Hub token; defaults to ``HF_TOKEN`` or the one cached by ``hf auth login``.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` as read by huggingface_hub at import.

    Returns:
        What was (or would be) pushed.

    Raises:
        ConfigError: The folder, its card, the repo id or the revision is invalid; nothing was sent.
        HubError: No token, offline mode, or the Hub refused or could not be reached; the folder is untouched.
    """
    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    check_revision(revision)
    files = list_upload_files(folder)
    card_text = load_card(folder)
    result = PushResult(repo_id, revision, private, files, card_text, dry_run=True)
    if dry_run:
        return result
    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or set HF_HUB_OFFLINE=0)")
    api = HfApi(endpoint=endpoint, token=resolve_token(token), library_name="fishmerge", library_version=__version__)
    message = commit_message or f"Upload {len(files)} files with fishmerge {__version__}"
    logger.info("Pushing %d files (%s bytes) from %s to %s", len(files), f"{result.total_size:,}", folder, repo_id)
    commit_url = _send(api, folder, repo_id, private=private, revision=revision, message=message)
    logger.info("Pushed %s: %s", repo_id, commit_url)
    return PushResult(repo_id, revision, private, files, card_text, dry_run=False, commit_url=commit_url)


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse.

    Raises:
        ConfigError: With the expected form.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(
            f"invalid repo id {repo_id!r} ({one_line(err)}): use namespace/name with letters, digits, '-', '_' or '.'"
        ) from None


def list_upload_files(folder: Path) -> tuple[PushedFile, ...]:
    """The files ``upload_folder`` sends from ``folder``: all regular files except .git and the local HF cache.

    Raises:
        ConfigError: The folder is missing, not a folder or empty.
    """
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: pass the output folder of a merge or federated run")
    # Same listing and filtering as HfApi.upload_folder, so a dry run reports exactly what a push sends.
    by_path = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(by_path, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    files = tuple(PushedFile(path, by_path[path].stat().st_size) for path in kept)
    if not files:
        raise ConfigError(f"{folder} holds no files to push: point at a folder with a checkpoint and its {CARD_NAME}")
    return files


def load_card(folder: Path) -> str:
    """Read ``folder/README.md`` from disk and validate its metadata offline.

    Returns:
        The card text.

    Raises:
        ConfigError: No card, unreadable YAML, or metadata the Hub would reject.
    """
    path = folder / CARD_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CARD_NAME} model card: write one (fishmerge.cards renders it)")
    try:
        # A local file path: ModelCard.load reads it from disk and never downloads.
        card = ModelCard.load(path)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: the YAML metadata block cannot be read ({one_line(err)}): fix the block between the '---' lines"
        ) from None
    validate_card(card)
    return path.read_text(encoding="utf-8")


def resolve_token(token: str | None = None) -> str:
    """The token to push with: the argument, else ``HF_TOKEN``, else the one cached by ``hf auth login``.

    Raises:
        HubError: No token is available.
    """
    if token:
        return token
    try:
        found = get_token()
    except Exception as err:  # noqa: BLE001 - a failing token source (e.g. OIDC exchange) must surface as HubError
        raise HubError(
            f"could not obtain a Hugging Face token ({type(err).__name__}): run `hf auth login` or set HF_TOKEN"
        ) from None
    if not found:
        raise HubError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access")
    return found


def check_revision(revision: str | None) -> None:
    """Refuse a branch name that is empty, holds spaces or is a full ref.

    Raises:
        ConfigError: With the expected form.
    """
    if revision is None:
        return
    if not revision.strip() or any(c.isspace() for c in revision) or revision.startswith("refs/"):
        raise ConfigError(f"invalid branch name {revision!r}: use a plain branch name without spaces, e.g. 'exp-1'")


def _send(api: HfApi, folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str) -> str:
    """The network part: repo, branch, one commit. Every failure becomes a one-line HubError."""
    try:
        # private=None leaves a new repository at the namespace default (some organisations force private).
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, revision=revision)
    except Exception as err:  # noqa: BLE001 - server, transport, xet and malformed-answer errors all mean "push failed"
        logger.debug("push to %s failed", repo_id, exc_info=True)
        raise HubError(_describe(err, repo_id, api.endpoint)) from err
    return str(info.commit_url)


def _describe(err: Exception, repo_id: str, endpoint: str) -> str:
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        server = f": {one_line(err.server_message)}" if err.server_message else ""
        if status in (401, 403):
            return (
                f"the Hub refused the push to {repo_id} ({status}{server}): check the token has write access to "
                f"that namespace (`hf auth login`); {_RETRY_HINT}"
            )
        return f"the Hub answered {status} while pushing to {repo_id}{server}; {_RETRY_HINT}"
    if isinstance(err, (TransportError, ConnectionError, TimeoutError)):
        return (
            f"could not reach {endpoint} while pushing to {repo_id} ({type(err).__name__}: {one_line(err)}): "
            f"check the connection and HF_ENDPOINT; {_RETRY_HINT}"
        )
    return f"pushing to {repo_id} failed ({type(err).__name__}: {one_line(err)}); {_RETRY_HINT}"
