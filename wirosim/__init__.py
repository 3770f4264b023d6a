"""wirosim: a faithful simulator of Wiro's DreamOmni2 API for tests and local runs.

Run it with ``uvicorn --factory wirosim.app:create_app``; configure it with WIROSIM_*
environment variables (see ``SimConfig``) and, at runtime, through the unauthenticated
``/_sim`` control plane: GET/PUT /_sim/config, POST /_sim/reset, GET /_sim/runs,
/_sim/tasks, /_sim/callbacks and /_sim/stats.
"""

from wirosim.app import create_app
from wirosim.config import Fault, SimConfig

__all__ = ["Fault", "SimConfig", "create_app"]
