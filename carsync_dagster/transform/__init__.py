"""Pure normalisation of Car records into the cars and rejected frames (no I/O)."""

from carsync_dagster.transform.normalisation import (
    CARS_COLUMNS,
    CARS_SCHEMA,
    REJECTED_COLUMNS,
    Batch,
    data_hash_of,
    normalise,
)

__all__ = ["CARS_COLUMNS", "CARS_SCHEMA", "REJECTED_COLUMNS", "Batch", "data_hash_of", "normalise"]
