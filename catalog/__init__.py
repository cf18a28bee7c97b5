"""Storage and query layer of the circuit catalogue.

    import catalog
    cat = catalog.open("circuits")         # read-only queries
    cat.sql("SELECT * FROM circuits")      # -> pandas DataFrame
"""

from catalog.errors import UserError
from catalog.store import Catalog, init, new_id
from catalog.store import open_catalog as open  # noqa: A001

__all__ = ["Catalog", "UserError", "init", "new_id", "open"]
