"""The version an alias points at, loaded and kept current: the watcher reads the alias every `poll_seconds`; when it
moves (the nightly job promotes, `loraflow rollback` moves it back) the new version is loaded beside the live one and
swapped in with one assignment. Each request holds the version it started on, so in-flight requests (streams too)
finish there and none fails. A version that fails to load, or does not answer the prompts it was evaluated on as the
evaluation did (tasks/parity.py), is not switched to; the live one keeps serving and the log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.deploy.batcher import Batcher
from tasks.deploy.engine import ServedModel, load_version
from tasks.parity import EvaluatedAnswers, Parity, served_answers

_logger = logging.getLogger("loraflow.deploy")


@dataclass
class LiveVersion:
    """One loaded version and the batcher its chat requests go through."""

    version: str
    model: ServedModel
    batcher: Batcher
    created: int = 0  # when the version was registered, in seconds (OpenAI's model list shows it)


@dataclass
class FollowerEvents:
    """What the follower tells the server's metrics: a switch (from, to), a refused version (why), a batch's size."""

    switched: Callable[[str | None, str], None] = lambda previous, version: None
    refused: Callable[[str, str], None] = lambda version, reason: None
    batch: Callable[[int], None] = lambda size: None


class AliasFollower:
    """The version `name@alias` points at, loaded, and kept current by `refresh`."""

    def __init__(self, name: str, alias: str, max_batch: int = 8, engine: str = "transformers",
                 events: FollowerEvents | None = None):
        self.name, self.alias, self.max_batch = name, alias, max_batch
        self.engine = engine
        self.events = events or FollowerEvents()
        self.live: LiveVersion | None = None
        self.refused: str | None = None  # a version that failed to load: not tried again until the alias moves on

    def refresh(self) -> None:
        """Load and switch to the alias's version if it moved; keep the live one if reading or loading fails."""
        try:
            found = MlflowClient().get_model_version_by_alias(self.name, self.alias)
            version = str(found.version)
        except MlflowException as error:
            _logger.warning(f"{self.name}@{self.alias}: cannot read the alias ({str(error).splitlines()[0]}); "
                            f"still serving version {self.live.version if self.live else 'none'}")
            return
        if (self.live is not None and version == self.live.version) or version == self.refused:
            return
        try:
            loaded = load_version(f"models:/{self.name}/{version}", self.engine)
        except Exception as error:  # any failure to load (missing weights, bad config, import error) keeps the old
            return self._refuse(version, "load", f"it failed to load ({type(error).__name__}: "
                                                 f"{str(error).splitlines()[0] if str(error) else ''})")
        if (differs := self._parity_failure(version, loaded)) is not None:
            return self._refuse(version, "parity", f"it does not answer as it was evaluated: {differs}")
        previous = self.live
        self.live = LiveVersion(version, loaded, Batcher(loaded, self.max_batch, on_batch=self.events.batch),
                                (found.creation_timestamp or 0) // 1000)
        self.refused = None  # the switch: one assignment above
        if previous is not None:
            previous.batcher.close()
        self.events.switched(previous.version if previous else None, version)
        _logger.warning(f"{self.name}@{self.alias}: now serving version {version}"
                        + (f" (was {previous.version})" if previous else ""))

    def _refuse(self, version: str, reason: str, why: str) -> None:
        self.refused = version
        self.events.refused(version, reason)
        _logger.error(f"{self.name} version {version}: not switched to, {why}; still serving version "
                      f"{self.live.version if self.live else 'none'}")

    def _parity_failure(self, version: str, loaded: ServedModel) -> str | None:
        """Why the loaded version's answers to the prompts it was evaluated on differ from the evaluated answers
        (tasks/parity.py), or None. Checked for the transformers engine, which serves the evaluated computation;
        a version registered before the check existed carries no answers to check."""
        if self.engine != "transformers" or loaded.evaluated_answers is None:
            return None
        evaluated = EvaluatedAnswers.read(loaded.evaluated_answers)
        parity = Parity.of(evaluated, served_answers(loaded.model, evaluated))
        if parity.share < 1.0:
            return parity.describe("share of identical answers")
        _logger.info(f"{self.name} version {version}: answers its {len(evaluated.answers)} evaluated prompts as "
                     "evaluated")
        return None

    def serving(self) -> LiveVersion:
        """The version live now; a request holds it to its end, whatever switch comes meanwhile."""
        live = self.live
        if live is None:
            raise LookupError(f"{self.name}@{self.alias}: no version is loaded")
        return live
