"""The record of every experiment: see db/README.md."""

from .blind import is_blinded
from .models import SCHEMA_VERSION, STANCE_LABELS
from .store import Store, StoreError, default_db_url

__all__ = ["Store", "StoreError", "STANCE_LABELS", "SCHEMA_VERSION", "default_db_url", "is_blinded"]
