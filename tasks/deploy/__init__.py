"""Stage 6, deploy: the version an alias points at (`champion`), served over HTTP as OpenAI's and MLflow's clients
expect, following the alias as it moves.

- follower.py: the alias watched, each new version loaded beside the live one and switched to with one assignment
- engine.py: a loaded version as the server drives it (transformers, or vLLM with `--engine vllm`)
- batcher.py: requests that arrive together answered by one generate call
- openai_api.py: the request fields taken and the answers' shapes (completions, streamed chunks, the model list)
- app.py: the HTTP API (FastAPI): authorization, admission limits, streaming, /invocations, /health, /metrics
- metrics.py: the Prometheus metrics an operator watches
- server.py: uvicorn in a thread, and the alias watcher
"""

from tasks.deploy.app import ServerLimits
from tasks.deploy.batcher import Batcher, Sampling
from tasks.deploy.follower import AliasFollower
from tasks.deploy.server import API_KEY_ENV, Deployment, check_exposure, deploy

__all__ = ["API_KEY_ENV", "AliasFollower", "Batcher", "Deployment", "Sampling", "ServerLimits", "check_exposure",
           "deploy"]
