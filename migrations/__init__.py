"""The schema's Alembic environment, shipped inside the ``dreamgate`` wheel.

``dreamgate migrate`` builds its Alembic configuration here, in code, and finds ``env.py``
and ``versions/`` next to this file through :mod:`importlib.resources`, so it works from
any directory after a plain ``pip install``. ``alembic.ini`` at the repository's root is
only for writing new revisions (``alembic revision --autogenerate``) from a checkout.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for the installed migrations, against ``database_url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files(__name__)))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema of ``database_url`` to ``revision`` (the newest by default)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)
