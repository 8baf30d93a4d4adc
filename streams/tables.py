"""The customer state table: customer key -> CustomerState JSON (changelog-backed)."""

from __future__ import annotations

import faust
from faust.types import TableT

CUSTOMERS_TABLE = "customers"


def declare_customer_table(app: faust.App, partitions: int) -> TableT[bytes, bytes]:
    # Raw bytes both ways: keys are the customer key as produced on the input
    # topic, and pydantic (de)serializes the state faster than faust's codecs.
    return app.Table(
        CUSTOMERS_TABLE,
        # bytes types select faust's raw codec for the store and the changelog.
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="Per-customer state: contact points, consents, carts, journeys",
    )
