"""``fishmerge push``: publish a result folder to the Hugging Face Hub, and the ``--push-to-hub`` flag of others.

Sub-commands that write a folder (merge, federate) call :func:`add_push_arguments` on their parser,
:func:`check_push_args` before the work starts and :func:`push_from_args` once the folder is complete, so every
command pushes the same way.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fishmerge.hub import PushResult, check_repo_id, check_revision, push_folder, resolve_token

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``push`` sub-command."""
    parser = subparsers.add_parser(
        "push",
        help="publish a result folder (with its README.md model card) to the Hugging Face Hub",
        description=(
            "Upload FOLDER to the Hub model repository REPO_ID in one commit, creating the repository if needed. "
            "The token comes from HF_TOKEN or `hf auth login`. Pushing again after a failure is safe."
        ),
    )
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="folder holding the checkpoint and its README.md")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target repository, namespace/name")
    _add_visibility_argument(parser)
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", metavar="MSG", help="commit title")
    parser.add_argument(
        "--dry-run", action="store_true", help="check everything and list what would be sent, without sending anything"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Push (or dry-run) and print the report."""
    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    print(result.summary())
    return 0


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--push-to-hub REPO_ID``, ``--private`` and ``--hub-revision`` to another sub-command's parser."""
    group = parser.add_argument_group("publishing to the Hugging Face Hub")
    group.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="push the finished output folder to this Hub repository"
    )
    _add_visibility_argument(group)
    group.add_argument("--hub-revision", metavar="BRANCH", default=None, help="branch to push to (created if missing)")


def check_push_args(args: argparse.Namespace) -> None:
    """Fail fast, before hours of work, if ``--push-to-hub`` is given with a bad repo id, branch or no token.

    Raises:
        ConfigError: Invalid repo id or branch.
        HubError: No token available.
    """
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        return
    check_repo_id(repo_id)
    check_revision(args.hub_revision)
    resolve_token()


def push_from_args(folder: Path, args: argparse.Namespace) -> PushResult | None:
    """Push ``folder`` if the command line asked for it (``--push-to-hub``); print and return the report.

    Args:
        folder: The finished output folder, holding its README.md card.
        args: Parsed arguments of a parser that went through :func:`add_push_arguments`.

    Returns:
        The push report, or None when ``--push-to-hub`` was not given.

    Raises:
        ConfigError: The folder's card or the repo id is invalid.
        HubError: The push failed; the folder is untouched and can be pushed with ``fishmerge push``.
    """
    repo_id = getattr(args, "push_to_hub", None)
    if not repo_id:
        return None
    result = push_folder(Path(folder), repo_id, private=args.private, revision=args.hub_revision)
    print(result.summary())
    return result


def _add_visibility_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (an existing repository keeps its visibility)",
    )
