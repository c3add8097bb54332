"""One Slack-compatible message to the recipe's webhook (`notify.webhook_url`, or LORAFLOW_WEBHOOK_URL), through
Prefect's own webhook notification block; a webhook that cannot be reached is logged and changes nothing else."""

from __future__ import annotations

import os

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.logging import get_logger

from conf.schema import RunConfig

WEBHOOK_ENV = "LORAFLOW_WEBHOOK_URL"


def webhook_url(config: RunConfig | None) -> str | None:
    configured = config.notify.webhook_url if config is not None else None
    return configured or os.environ.get(WEBHOOK_ENV)


def post_webhook(url: str, text: str, message: dict) -> None:
    try:
        CustomWebhookNotificationBlock(name="loraflow-notify", url=url, json_data=message).notify(text)
    except Exception as error:  # an unreachable webhook must not change what the flow did
        get_logger("loraflow.notify").warning(f"notification to {url} failed: {error}")
